"""End to end: ``python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=teamtr`` (the stock entry point) trains a
team of two tiny agents (different sizes and tokenizers) on CPU with real Ray, FSDP workers and vLLM servers.

* teamtr, 2 stages, a huge learning rate, δ enforced: every committed update has KL <= δ (or it was given up and
  counted), weights changed, each agent's servers hold its own actor's weights after every sync; alice samples at
  her own temperature (0.7, bob at the rollout's 1.0) and her actor scores her tokens at it;
* resume with a swap: a second run continues from the stage-1 checkpoint with bob replaced by another model
  (``teamtr.replace``) and a δ so small that no update can move the weights: the weights it saves must equal alice's
  saved ones and the new bob's initial ones to 1e-12, and β must be exactly verl's adaptive rule applied once to
  alice's saved β and to a fresh β for bob; a third run resumes the swapped team as it is;
* the `stale` schedule runs from the same entry point (the paper's central comparison is one flag), here on a
  three-agent round-robin team where one agent speaks twice;
* a frozen agent (`train: false`) speaks through its own servers, with no actor worker, and is never updated,
  synced or saved;
* an aligned swap (Stage 0) probes the team with the incumbent, measures the newcomer's KL on held-out probe
  messages, hands the agent's turns to the newcomer's servers and ends the incumbent's actors; one that misses δ₀ is
  refused, saving nothing, and the same swap with a δ₀ the distillation reaches is made (the monitor from above δ₀
  to within it).
"""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from teamtr_verl import algos
from teamtr_verl.fixtures import build_tiny_model, permuted_vocabulary_copy, perturbed_copy, write_addition_dataset
from teamtr_verl.runs import run_main_ppo, team_override

pytestmark = pytest.mark.e2e

DELTA = 0.01
DEFAULT_BETA_INIT = 0.1  # teamtr.beta_init of the tiny CPU config
# alice's own sampling temperature: her actor must recompute her log-probs at it (rollout_probs_diff_max below)
ALICE_SAMPLING = "+teamtr.agents.0.sampling={temperature: 0.7}"


@pytest.fixture(scope="module")
def team(tiny_team, tmp_path_factory):
    data = write_addition_dataset(tmp_path_factory.mktemp("trainer_data") / "data", n_train=16, n_val=4)
    return (*tiny_team, data)


def run_teamtr(team, workdir: Path, *overrides: str, delta: float = DELTA):
    alice, bob, data = team
    result, rows = run_main_ppo("teamtr_tiny_cpu", [
        team_override({"alice": alice, "bob": bob}),
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        f"teamtr.delta={delta}", ALICE_SAMPLING, *overrides,
    ], workdir)
    assert result.returncode == 0, f"see {workdir}/stderr.log\n{result.stderr[-4000:]}"
    return {step: data for step, data in rows.items() if "teamtr/stage/return_mean" in data}


def hf_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    assert weights, f"no safetensors in {folder}"
    return weights


@pytest.fixture(scope="module")
def two_stages(team, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teamtr_run")
    ckpt = workdir / "ckpt"
    stages = run_teamtr(
        team, workdir, "trainer.total_training_steps=2", "trainer.save_freq=1", f"trainer.default_local_dir={ckpt}",
        "actor_rollout_ref.actor.optim.lr=0.02",  # huge: full steps leave the region, enforcement must act
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "teamtr.order=random", "teamtr.max_backtracks=10",  # up to 1/1024 of the step
    )
    return stages, ckpt, workdir


def test_teamtr_stages_respect_each_agents_trust_region(two_stages, team):
    stages, ckpt, _ = two_stages
    assert sorted(stages) == [1, 2]
    for metrics in stages.values():
        for agent in ("alice", "bob"):
            if metrics[f"teamtr/{agent}/committed"] == 1.0:
                assert metrics[f"teamtr/{agent}/kl"] <= DELTA
            else:  # given up: counted, and the weights stayed at π_cur
                assert metrics[f"teamtr/{agent}/give_ups_total"] >= 1
            assert metrics[f"teamtr/{agent}/kl_proposal"] > DELTA  # lr 0.02 really overshoots: enforcement acted
            # vLLM log-probs of the rollout vs the actor's own: each agent's servers hold its actor's weights, and
            # alice's actor divides her logits by her own temperature (scored at 1.0 they differed by 3e-3: the tiny
            # models are near-uniform, so temperature moves their probabilities little)
            assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3
            # 4 prompts x n=2, one turn each in a chain; one prompt of 4 (25 %) is held out to measure the update on
            assert metrics[f"teamtr/{agent}/messages"] == 6
        assert {metrics["teamtr/alice/position"], metrics["teamtr/bob/position"]} == {0, 1}
        assert "teamtr/stage/certificate" in metrics or not any(
            metrics[f"teamtr/{a}/committed"] for a in ("alice", "bob"))
        # every update is measured on its own stage's episodes: one paired gain per update (closing regeneration)
        assert metrics["teamtr/stage/gain_measurements"] == 2
        # prefix reuse (on by default): 3 regenerations of 4 prompts x 2 samples x 2 turns; after each update the
        # next one keeps every turn before the updated agent's first: alice's turn after bob's update (8), nothing
        # after alice's, everything (16) after a given-up update
        first, second = sorted(("alice", "bob"), key=lambda a: metrics[f"teamtr/{a}/position"])
        reused = sum(16 if metrics[f"teamtr/{a}/committed"] == 0.0 else 8 if a == "bob" else 0 for a in (first, second))
        assert metrics["teamtr/stage/turns_reused"] == reused
        assert metrics["teamtr/stage/turns_generated"] == 3 * 16 - reused
    # An agent with a committed update moved away from its initial model; an agent whose every update was given up
    # is still bit-identical to it (a give-up restores π_cur exactly). At least one agent must have committed.
    alice, bob, _ = team
    commits = {name: sum(m[f"teamtr/{name}/committed"] for m in stages.values()) for name in ("alice", "bob")}
    assert any(commits.values()), commits
    for name, initial in (("alice", alice), ("bob", bob)):
        before, after = hf_weights(initial), hf_weights(ckpt / "global_step_2" / name / "huggingface")
        changed = any(not torch.equal(before[k].float(), after[k].float()) for k in before if k in after)
        assert changed == bool(commits[name]), (name, commits)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    state = json.loads((ckpt / "global_step_2" / "teamtr_state.json").read_text())
    assert state["agent_names"] == ["alice", "bob"] and state["stages_done"] == 2


def test_resume_swaps_bob_for_a_new_model_and_carries_alice_beta_and_order_over(two_stages, team, tmp_path):
    """Resume the stage-1 checkpoint into a new directory with ``teamtr.replace`` swapping bob for another model
    (another size and tokenizer), then resume the swapped run once more.

    The resumed updates may move at most step_safety·sqrt(δ/KL_full) ≈ 1e-15 of their step (or are given up): the
    weights each run saves are the ones it started from to within 1e-12 (a zero-initialised bias can take a 1e-17
    step). So they prove what was loaded: alice's stage-1 checkpoint, bob's *new model directory* (not his
    checkpoint), then, after the swap, the new bob's own checkpoint. β moves once per update, by verl's adaptive rule
    on the full step's KL, from alice's saved β and from a fresh β for the new bob."""
    _, ckpt, _ = two_stages
    resumed_dir = tmp_path / "resumed"
    new_bob = build_tiny_model(tmp_path / "bob_v2", seed=2, num_layers=3)  # 3 layers, hidden 128, its own tokenizer
    swap = f"teamtr.replace={{agent: bob, model: '{new_bob}', method: direct}}"
    common = ("trainer.save_freq=1", f"trainer.default_local_dir={resumed_dir / 'ckpt'}", "teamtr.max_backtracks=0",
              "teamtr.step_safety=1e-9", "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
              "teamtr.order=random", swap)
    stages = run_teamtr(team, resumed_dir, "trainer.total_training_steps=2", "trainer.resume_mode=resume_path",
                        f"trainer.resume_from_path={ckpt / 'global_step_1'}", *common, delta=1e-12)
    assert sorted(stages) == [2]  # stage 1 was not redone
    assert stages[2]["teamtr/bob/replaced"] == 1.0
    for agent in ("alice", "bob"):  # each agent's servers serve its own actor's weights: the new bob's for bob
        assert stages[2][f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3, agent
    saved = json.loads((ckpt / "global_step_1" / "teamtr_state.json").read_text())
    after = json.loads((resumed_dir / "ckpt" / "global_step_2" / "teamtr_state.json").read_text())
    assert after["agent_models"]["bob"] == str(new_bob) and after["agent_models"]["alice"] == saved["agent_models"]["alice"]
    assert after["replacements"] == [{"stage": 1, "agent": "bob", "from": saved["agent_models"]["bob"],
                                      "to": str(new_bob), "method": "direct"}]
    started_from = {"alice": ckpt / "global_step_1" / "alice" / "huggingface", "bob": new_bob}
    start_beta = {"alice": saved["beta"]["alice"], "bob": {"beta": DEFAULT_BETA_INIT, "num_updates": 0}}
    for agent in ("alice", "bob"):
        w1, w2 = hf_weights(started_from[agent]), hf_weights(resumed_dir / "ckpt" / "global_step_2" / agent / "huggingface")
        assert set(w1) <= set(w2) and all(w1[k].shape == w2[k].shape for k in w1), agent  # the new bob's shapes
        assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) <= 1e-12, agent
        expected_beta = algos.adapt_beta(start_beta[agent]["beta"], stages[2][f"teamtr/{agent}/kl_proposal"], 1e-12)
        assert after["beta"][agent]["beta"] == pytest.approx(expected_beta, rel=1e-12)
        assert after["beta"][agent]["num_updates"] == start_beta[agent]["num_updates"] + 1
    committed = stages[2]["teamtr/alice/committed"] == 1.0
    assert after["kl_history"]["alice"][:-1 if committed else None] == saved["kl_history"]["alice"]
    # order: the stage-2 order is the next draw of the saved RNG (the swap does not touch it)
    rng = random.Random()
    version, internal, gauss = saved["order_rng_state"]
    rng.setstate((version, tuple(internal), gauss))
    expected = ["alice", "bob"]
    rng.shuffle(expected)
    assert [stages[2][f"teamtr/{a}/position"] for a in expected] == [0, 1]
    assert after["stages_done"] == 2

    # the swapped run resumes as it is, the same command line: no second swap, the new bob's checkpoint is loaded
    stages = run_teamtr(team, resumed_dir, "trainer.total_training_steps=3", "trainer.resume_mode=auto", *common,
                        delta=1e-12)
    # the metrics file keeps stage 2 of the swap run (a resumed run appends), and stage 3 reports no swap
    assert sorted(stages) == [2, 3] and stages[2]["teamtr/bob/replaced"] == 1.0
    assert "teamtr/bob/replaced" not in stages[3]
    final = json.loads((resumed_dir / "ckpt" / "global_step_3" / "teamtr_state.json").read_text())
    assert final["replacements"] == after["replacements"] and final["stages_done"] == 3
    w2 = hf_weights(resumed_dir / "ckpt" / "global_step_2" / "bob" / "huggingface")
    w3 = hf_weights(resumed_dir / "ckpt" / "global_step_3" / "bob" / "huggingface")
    assert max((w2[k].float() - w3[k].float()).abs().max().item() for k in w2) <= 1e-12
    assert stages[3]["teamtr/bob/rollout_probs_diff_max"] < 1e-3


# An aligned swap runs the newcomer's stack beside the team's: split placement needs a third device, and verl's
# batch of 6 prompts x n=2 must divide by it.
STAGE0_RUN = ("trainer.n_gpus_per_node=3", "ray_kwargs.ray_init.num_cpus=24", "data.train_batch_size=6",
              "trainer.total_training_steps=2", "trainer.resume_mode=resume_path")


def test_an_aligned_swap_probes_the_team_then_hands_bobs_turns_to_the_newcomer(two_stages, team, tmp_path):
    """Stage 0 from the stage-1 checkpoint, across tokenizers: the newcomer is the stage-1 bob with every ordinary
    token id moved (another vocabulary, the same model of text). The probe regeneration is the incumbent's (his
    tokens, his servers); the held-out messages re-tokenized for the newcomer measure a message-level KL of 0 (up to
    rounding), within δ₀ at epoch 0; then the stage trains the newcomer as bob, his turns rendered in the new vocabulary
    and sampled by the newcomer's servers (the incumbent's would answer in the old ids: the rollout-vs-actor log-prob
    gap would be far above 1e-3). Distillation epochs through Ray run in the refusal test below (top-k, shared
    vocabulary) and are measured in benchmarks/swap_demo.py (0.386 -> 0.043 in 3 epochs)."""
    _, ckpt, _ = two_stages
    newcomer = permuted_vocabulary_copy(ckpt / "global_step_1" / "bob" / "huggingface", tmp_path / "bob_permuted", 1)
    workdir = tmp_path / "aligned"
    stages = run_teamtr(team, workdir, *STAGE0_RUN, f"trainer.resume_from_path={ckpt / 'global_step_1'}",
                        "trainer.save_freq=1", f"trainer.default_local_dir={workdir / 'ckpt'}",
                        f"teamtr.replace={{agent: bob, model: '{newcomer}', delta0: 0.01}}")
    assert sorted(stages) == [2]
    metrics = stages[2]
    assert metrics["teamtr/bob/replaced"] == 1.0 and metrics["teamtr/stage0/delta0"] == 0.01
    assert metrics["teamtr/stage0/retokenized"] == 1.0 and metrics["teamtr/stage0/epochs"] == 0
    assert metrics["teamtr/stage0/untranslated_messages"] == 0  # every token string exists in the new vocabulary
    assert 0.0 <= metrics["teamtr/stage0/kl"] == metrics["teamtr/stage0/kl_initial"] < 1e-3
    assert metrics["teamtr/stage0/episodes"] == 12  # 6 prompts x n=2, bob speaks once in each
    assert metrics["teamtr/stage0/probe_messages"] + metrics["teamtr/stage0/heldout_messages"] == 12
    for agent in ("alice", "bob"):
        assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3, agent
    assert "teamtr/stage0/crn_gain" in metrics  # the stage's first regeneration paired with the probe
    # the incumbent's FSDP worker and vLLM server were ended with every process they started, before the stage
    # trained the newcomer (the agent watch would have stopped the run had it still watched them)
    assert metrics["teamtr/stage0/released_actors"] == 2 and metrics["teamtr/stage0/released_left"] == 0
    assert metrics["teamtr/stage0/released_processes"] >= 2 and metrics["teamtr/stage0/released_gib"] > 0.1
    state = json.loads((workdir / "ckpt" / "global_step_2" / "teamtr_state.json").read_text())
    assert state["agent_models"]["bob"] == str(newcomer)
    record = state["replacements"][0]
    assert (record["method"], record["stage"], record["epochs"], len(record["kl_curve"])) == (
        "aligned", 1, metrics["teamtr/stage0/epochs"], metrics["teamtr/stage0/epochs"] + 1)
    stage0 = [u for u in state["ledger"] if u.get("stage0")]
    assert len(stage0) == 1 and stage0[0]["surrogate"] == 0.0 and stage0[0]["crn_gain"] is not None


def test_an_aligned_swap_is_refused_out_of_reach_and_made_once_distillation_brings_the_kl_within_delta0(
        two_stages, team, tmp_path):
    """A noisy copy of the stage-1 bob (same vocabulary: the top-k path). First with δ₀ = 1e-9 and 3 epochs at
    Stage 0's own lr 1e-4: refused, nothing written, the checkpoint untouched, and the curve says how far top-k
    distillation through Ray brought the held-out KL. Then the same swap (the same probe: same checkpoint, prompts and
    seeds) with δ₀ halfway between the initial KL and the curve's lowest point: the monitor starts above δ₀ and Stage 0
    stops at the first epoch at or below it; the newcomer's servers then serve its aligned weights. Last, the swapped
    run resumes as it is."""
    _, ckpt, _ = two_stages
    alice, bob, data = team
    newcomer = perturbed_copy(ckpt / "global_step_1" / "bob" / "huggingface", tmp_path / "bob_noisy", 0.2, seed=4,
                              tokenizer_dir=bob)
    before = (ckpt / "global_step_1" / "teamtr_state.json").read_bytes()

    def swap(workdir, delta0, *run):
        return run_main_ppo("teamtr_tiny_cpu", [
            team_override({"alice": alice, "bob": bob}),
            f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}", ALICE_SAMPLING,
            *(run or (*STAGE0_RUN, f"trainer.resume_from_path={ckpt / 'global_step_1'}")), "trainer.save_freq=1",
            f"trainer.default_local_dir={workdir / 'ckpt'}",
            f"teamtr.replace={{agent: bob, model: '{newcomer}', delta0: {delta0!r}, max_epochs: 3, lr: 1.0e-4}}",
        ], workdir)

    refused = tmp_path / "refused"
    result, rows = swap(refused, 1.0e-9)
    assert result.returncode != 0
    message = re.search(r"teamtr.replace: agent 'bob' -> \S+: not aligned within 3 steps: KL (\S+) > delta0 1e-09 "
                        r"\(curve ([^)]*)\); the swap is refused. Nothing was saved", result.stderr)
    assert message, result.stderr[-3000:]
    assert not rows and not (refused / "ckpt").exists()  # no stage ran, nothing was written
    assert (ckpt / "global_step_1" / "teamtr_state.json").read_bytes() == before
    curve = [float(v) for v in message.group(2).split(", ")]
    assert len(curve) == 4 and min(curve[1:]) < 0.9 * curve[0], curve  # distillation brought the held-out KL down
    delta0 = (curve[0] + min(curve[1:])) / 2
    made = tmp_path / "made"
    result, rows = swap(made, delta0)
    assert result.returncode == 0, f"see {made}/stderr.log\n{result.stderr[-3000:]}"
    metrics = next(data for data in rows.values() if "teamtr/stage0/kl" in data)
    assert metrics["teamtr/stage0/kl_initial"] > delta0 >= metrics["teamtr/stage0/kl"]  # from above δ₀ to within it
    assert 1 <= metrics["teamtr/stage0/epochs"] <= 3 and metrics["teamtr/stage0/retokenized"] == 0.0
    for agent in ("alice", "bob"):  # each agent's servers hold its own actor's weights, the newcomer's its aligned ones
        assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3, agent
    assert metrics["teamtr/stage0/released_left"] == 0
    # the swapped run resumes with the same teamtr.replace and the team's own two devices: no second Stage 0, the
    # newcomer's checkpoint is loaded into its servers, one more stage trains
    result, rows = swap(made, delta0, "trainer.n_gpus_per_node=2", "data.train_batch_size=6",
                        "trainer.total_training_steps=3", "trainer.resume_mode=auto")
    assert result.returncode == 0, f"see {made}/stderr.log\n{result.stderr[-3000:]}"
    stages = {step: data for step, data in rows.items() if "teamtr/stage/return_mean" in data}
    assert sorted(stages) == [2, 3] and not any("stage0" in key or "replaced" in key for key in stages[3])
    assert stages[3]["teamtr/bob/rollout_probs_diff_max"] < 1e-3
    state = json.loads((made / "ckpt" / "global_step_3" / "teamtr_state.json").read_text())
    assert state["agent_models"]["bob"] == str(newcomer) and len(state["replacements"]) == 1
    assert state["replacements"][0]["target"] == "incumbent" and state["stages_done"] == 3


def test_stale_schedule_runs_a_three_agent_round_robin_from_the_same_entry_point(team, tmp_path):
    from teamtr_verl.fixtures import build_tiny_model

    alice, bob, data = team
    carol = build_tiny_model(tmp_path / "carol", seed=2)
    # alice speaks twice (turns 1 and 4): her rows are twice bob's and carol's; verl pads each agent's rows to whole
    # mini-batches, which the validated micro-batches divide.
    result, rows = run_main_ppo("teamtr_tiny_cpu", [
        team_override({"alice": alice, "bob": bob, "carol": carol}), "trainer.n_gpus_per_node=3",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        "teamtr.router={kind: round_robin, turns: 4}", "teamtr.schedule=stale", "trainer.total_training_steps=1",
        "data.train_batch_size=6",  # verl: prompts x n must divide over the 3 devices
    ], tmp_path)
    assert result.returncode == 0, f"see {tmp_path}/stderr.log\n{result.stderr[-4000:]}"
    metrics = rows[1]
    # One regeneration for the whole stage: only the first agent of the order waited for generation.
    assert metrics["teamtr/alice/gen_s"] > 0 and metrics["teamtr/bob/gen_s"] == metrics["teamtr/carol/gen_s"] == 0.0
    # two of 6 prompts held out: 4 prompts x n=2 episodes, alice's two turns each
    assert (metrics["teamtr/alice/messages"], metrics["teamtr/bob/messages"], metrics["teamtr/carol/messages"]) == (
        16, 8, 8)
    # the closing regeneration measures the stage's updates together, on the same episodes (one paired gain)
    assert metrics["teamtr/stage/closing_gen_s"] > 0 and metrics["teamtr/stage/gain_measurements"] == 1
    assert metrics["teamtr/alice/crn_gain"] == metrics["teamtr/bob/crn_gain"] == metrics["teamtr/carol/crn_gain"]


def test_a_frozen_agent_speaks_but_has_no_worker_and_is_never_updated_or_saved(team, tmp_path):
    alice, bob, data = team
    ckpt = tmp_path / "ckpt"
    result, rows = run_main_ppo("teamtr_tiny_cpu", [
        f"teamtr.agents=[{{name: alice, model: '{alice}'}}, {{name: bob, model: '{bob}', train: false}}]",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        "trainer.total_training_steps=1", "trainer.save_freq=1", f"trainer.default_local_dir={ckpt}",
    ], tmp_path)
    assert result.returncode == 0, f"see {tmp_path}/stderr.log\n{result.stderr[-4000:]}"
    metrics = rows[1]
    # alice alone is updated: 4 prompts x n=2 minus the held-out prompt's 2; bob has no metrics at all
    assert metrics["teamtr/alice/messages"] == 6 and metrics["teamtr/alice/position"] == 0
    assert not [key for key in metrics if key.startswith("teamtr/bob/")]
    # one update: one regeneration before it and the closing one, each of 4 prompts x 2 episodes with bob's turns
    assert metrics["teamtr/stage/episodes"] == 2 * 4 * 2 and metrics["teamtr/stage/gain_measurements"] == 1
    assert sorted(p.name for p in (ckpt / "global_step_1").iterdir()) == ["alice", "data.pt", "teamtr_state.json"]
    state = json.loads((ckpt / "global_step_1" / "teamtr_state.json").read_text())
    assert state["frozen_agents"] == ["bob"] and list(state["beta"]) == ["alice"]
    # bob's servers are up and watched; he has no FSDP worker (those are named teamtr_<agent>_...)
    text = result.stdout + result.stderr
    assert re.search(r"teamtr: agent bob: vllm_server_1_0 \(pid \d+\)", text), text[-3000:]
    assert "teamtr_bob_" not in text

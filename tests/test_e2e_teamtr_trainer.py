"""End to end: ``python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=teamtr`` (the stock entry point) trains a
team of two tiny agents (different sizes and tokenizers) on CPU with real Ray, FSDP workers and vLLM servers.

* teamtr, 2 stages, a huge learning rate, δ enforced: every committed update has KL <= δ (or it was given up and
  counted), weights changed, each agent's servers hold its own actor's weights after every sync;
* resume: a second run continues from the stage-1 checkpoint with a δ no update can meet and no backtracking, so
  every update is given up: the weights it saves must equal the saved ones bit for bit, and β must be exactly the
  saved β times the backtrack factor;
* the `stale` schedule runs from the same entry point: the paper's central comparison is one flag.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teamtr_verl
from teamtr_verl.fixtures import write_addition_dataset

pytestmark = pytest.mark.e2e

CONFIG_DIR = Path(teamtr_verl.__file__).parent / "configs"
DELTA = 0.01


@pytest.fixture(scope="module")
def team(tiny_team, tmp_path_factory):
    data = write_addition_dataset(tmp_path_factory.mktemp("trainer_data") / "data", n_train=16, n_val=4)
    return (*tiny_team, data)


def run_teamtr(team, workdir: Path, *overrides: str, delta: float = DELTA):
    alice, bob, data = team
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file = workdir / "metrics.jsonl"
    command = [
        sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={CONFIG_DIR}", "--config-name=teamtr_tiny_cpu",
        f"teamtr.agents=[{{name: alice, model: '{alice}'}}, {{name: bob, model: '{bob}'}}]",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        "trainer.logger=[console,file]", f"teamtr.delta={delta}", *overrides,
    ]
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_file), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    (workdir / "stdout.log").write_text(result.stdout)
    (workdir / "stderr.log").write_text(result.stderr)
    assert result.returncode == 0, f"see {workdir}/stderr.log\n{result.stderr[-4000:]}"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {row["step"]: row["data"] for row in rows if "teamtr/stage/return_mean" in row["data"]}


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
            # vLLM log-probs of the rollout vs the actor's own: each agent's servers hold its actor's weights
            assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3
            assert metrics[f"teamtr/{agent}/messages"] == 8  # 4 prompts x n=2, one turn each in a chain
        assert {metrics["teamtr/alice/position"], metrics["teamtr/bob/position"]} == {0, 1}
        assert "teamtr/stage/certificate" in metrics or not any(
            metrics[f"teamtr/{a}/committed"] for a in ("alice", "bob"))
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


def test_resume_continues_with_the_saved_weights_beta_and_order(two_stages, team, tmp_path):
    _, ckpt, _ = two_stages
    resumed_dir = tmp_path / "resumed"
    # Resume the stage-1 checkpoint into a new directory. With δ = 1e-12 and no backtracking every update is given
    # up and restored: nothing may move but β, by exactly one backtrack factor (the optimizer itself is restored from
    # the checkpoint, learning rate included, so a different lr on the command line would not be used).
    stages = run_teamtr(
        team, resumed_dir, "trainer.total_training_steps=2", "trainer.save_freq=1",
        f"trainer.default_local_dir={resumed_dir / 'ckpt'}", "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={ckpt / 'global_step_1'}", "teamtr.max_backtracks=0",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "teamtr.order=random",
        delta=1e-12,
    )
    assert sorted(stages) == [2]  # stage 1 was not redone
    saved = json.loads((ckpt / "global_step_1" / "teamtr_state.json").read_text())
    after = json.loads((resumed_dir / "ckpt" / "global_step_2" / "teamtr_state.json").read_text())
    for agent in ("alice", "bob"):
        assert stages[2][f"teamtr/{agent}/committed"] == 0.0
        # weights: loaded exactly as saved, and restored exactly after the rejected update
        w1 = hf_weights(ckpt / "global_step_1" / agent / "huggingface")
        w2 = hf_weights(resumed_dir / "ckpt" / "global_step_2" / agent / "huggingface")
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), agent
        # β: the saved value, times the backtrack factor of the give-up
        assert after["beta"][agent]["beta"] == pytest.approx(saved["beta"][agent]["beta"] * 1.5, rel=1e-12)
        assert after["beta"][agent]["num_give_ups"] == saved["beta"][agent]["num_give_ups"] + 1
        assert after["kl_history"][agent] == saved["kl_history"][agent]  # nothing committed
    # order: the stage-2 order is the next draw of the saved RNG
    rng = random.Random()
    version, internal, gauss = saved["order_rng_state"]
    rng.setstate((version, tuple(internal), gauss))
    expected = ["alice", "bob"]
    rng.shuffle(expected)
    assert [stages[2][f"teamtr/{a}/position"] for a in expected] == [0, 1]
    assert after["stages_done"] == 2


def test_stale_schedule_runs_from_the_same_entry_point(team, tmp_path):
    stages = run_teamtr(team, tmp_path, "trainer.total_training_steps=1", "teamtr.schedule=stale")
    metrics = stages[1]
    # One regeneration for the whole stage: only the first agent of the order waited for generation.
    assert metrics["teamtr/alice/gen_s"] > 0 and metrics["teamtr/bob/gen_s"] == 0.0
    assert metrics["teamtr/alice/messages"] == metrics["teamtr/bob/messages"] == 8

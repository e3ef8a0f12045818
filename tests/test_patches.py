"""The patches of upstream internals in teamtr_verl/patches.py that apply on every platform, and where the vLLM
entry point leads. (The CPU-only patches are exercised in test_cpu_runtime.py.)"""

import importlib.metadata as md
import json

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

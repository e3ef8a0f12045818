"""Fault drills on CPU (real verl, Ray, vLLM): a TeamTR run with ``teamtr.save_every_update=true`` is killed with
SIGKILL -- the driver and every process it started, as when its node dies -- once during an agent update and once
during a regeneration, and resumed each time with ``trainer.resume_mode=auto``:

* no checkpoint is half-written: the resume pointer names a complete folder, no scratch folder is counted;
* killed during bob's update of stage 1, the run resumes inside stage 1 from the checkpoint after alice's update and
  updates bob only; killed during stage 2's first regeneration, it resumes from the end of stage 1;
* the metrics file holds every stage exactly once, and stage 1's line has both agents' updates.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teamtr_verl.fixtures import write_addition_dataset
from teamtr_verl.runs import start_main_ppo, team_override

pytestmark = pytest.mark.e2e


def wait_for(process, log: Path, pattern: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before printing {pattern!r}; see {log}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s; see {log}")


def kill(process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)  # Ray processes outside the group


def stage_lines(metrics_file: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()
            if line.strip() and "teamtr/stage/return_mean" in json.loads(line)["data"]]


def test_kills_during_an_update_and_a_regeneration_lose_at_most_that_update(tiny_team, tmp_path):
    alice, bob = tiny_team
    data = write_addition_dataset(tmp_path / "data", n_train=16, n_val=4)
    ckpt, metrics_file = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    overrides = [team_override({"alice": alice, "bob": bob}), f"data.train_files={data / 'train.parquet'}",
                 f"data.val_files={data / 'test.parquet'}", "trainer.total_training_steps=2",
                 f"trainer.default_local_dir={ckpt}", "trainer.resume_mode=auto", "teamtr.save_every_update=true"]

    def start(name):
        return start_main_ppo("teamtr_tiny_cpu", overrides, tmp_path / name, metrics_file=metrics_file)

    # 1. killed while bob is being updated in stage 1: alice's update was checkpointed before bob's regeneration
    process, log = start("run1")
    wait_for(process, log, r"teamtr: stage 1: updating bob")
    kill(process)
    assert (ckpt / "teamtr_latest.txt").read_text() == "stage_1_update_1"
    state = json.loads((ckpt / "stage_1_update_1" / "teamtr_state.json").read_text())
    assert state["cursor"]["done"] == 1 and state["cursor"]["order"] == ["alice", "bob"]
    assert state["cursor"]["agent_dirs"] == {"alice": "stage_1_update_1/alice", "bob": "stage_1_update_1/bob"}
    assert not metrics_file.exists() or stage_lines(metrics_file) == []

    # 2. resumed inside stage 1 (bob only), then killed in stage 2's first regeneration
    process, log = start("run2")
    wait_for(process, log, r"teamtr: stage 2: regenerating before alice's update")
    kill(process)
    text = log.read_text(errors="replace")
    assert "teamtr: stage 1: updating alice" not in text and "teamtr: stage 1: updating bob" in text
    assert (ckpt / "teamtr_latest.txt").read_text() == "global_step_1"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["global_step_1"]  # in-stage folders collected
    assert stage_lines(metrics_file) == [1]
    stage1 = {}
    for line in metrics_file.read_text().splitlines():
        if line.strip() and json.loads(line)["step"] == 1:
            stage1.update(json.loads(line)["data"])
    for agent in ("alice", "bob"):  # alice's metrics came through the in-stage checkpoint
        assert stage1[f"teamtr/{agent}/messages"] == 6 and f"teamtr/{agent}/kl" in stage1

    # 3. resumed from the end of stage 1, runs to the end
    process, log = start("run3")
    assert process.wait(timeout=900) == 0, f"see {log}"
    assert stage_lines(metrics_file) == [1, 2]  # every stage once
    assert (ckpt / "teamtr_latest.txt").read_text() == "global_step_2"
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp_")]

"""Fault drills on CPU (real verl, Ray, vLLM), one run resumed twice (each start costs minutes on 2 cores): a TeamTR run
with ``teamtr.save_every_update=true`` is killed with SIGKILL -- the driver and every process it started, as when its
node dies -- once during an agent update and once during a regeneration, and resumed each time with
``trainer.resume_mode=auto``:

* no checkpoint is half-written: the resume pointer names a complete folder, no scratch folder is counted;
* killed during bob's update of stage 1, the run resumes inside stage 1 from the checkpoint after alice's update and
  updates bob only; killed during stage 2's first regeneration, it resumes from the end of stage 1;
* the metrics file holds every stage exactly once, and stage 1's line has both agents' updates;
* in the last resumed run one agent's vLLM server is killed: the run stops with an error that names the agent
  (teamtr_verl.watchdog), not a hang.
"""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from teamtr_verl.fixtures import write_addition_dataset
from teamtr_verl.runs import kill_session, start_main_ppo, team_override

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
    kill_session(process)  # the driver, Ray and every worker and vLLM engine process it started


def stage_lines(metrics_file: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()
            if line.strip() and "teamtr/stage/return_mean" in json.loads(line)["data"]]


def test_kills_during_an_update_a_regeneration_and_of_a_server(tiny_team, tmp_path):
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

    # 3. resumed from the end of stage 1; bob's vLLM server is killed while alice is updated: the run stops, naming
    #    bob, instead of waiting for bob's regeneration (the trainer listed every agent's actors and pids at start-up)
    process, log = start("run3")
    try:
        wait_for(process, log, r"teamtr: stage 2: updating alice")
        text = log.read_text(errors="replace")
        assert "teamtr: resumed from" in text and "global_step_1 after stage 1" in text
        pid = int(re.search(r"teamtr: agent bob: .*vllm_server_1_0 \(pid (\d+)\)", text)[1])
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        returncode = process.wait(timeout=300)  # not a hang
        print(f"the run stopped {time.monotonic() - started:.1f} s after bob's server was killed")
    finally:
        kill(process)  # a stopped driver can leave Ray's and vLLM's processes behind
    assert returncode != 0
    assert re.search(r"agent 'bob': its actor vllm_server_1_0 died", log.read_text(errors="replace")), f"see {log}"
    assert stage_lines(metrics_file) == [1]  # every stage once; stage 2 never finished
    latest = (ckpt / "teamtr_latest.txt").read_text()
    assert latest in ("global_step_1", "stage_2_update_1")  # alice's stage-2 update may have been saved
    assert json.loads((ckpt / latest / "teamtr_state.json").read_text())["stages_done"] == 1
    # the pointer names a complete folder (a scratch folder a kill left behind never counts): its state, its loader
    # and every agent folder its state refers to
    state = json.loads((ckpt / latest / "teamtr_state.json").read_text())
    assert (ckpt / latest / "data.pt").is_file()
    agent_dirs = state["cursor"]["agent_dirs"] if state["cursor"] else {a: f"{latest}/{a}" for a in ("alice", "bob")}
    assert all((ckpt / folder).is_dir() for folder in agent_dirs.values()), agent_dirs

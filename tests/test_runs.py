"""teamtr_verl.runs: killing a run kills every process it started (what a fault drill relies on)."""

import subprocess
import sys
import textwrap
import time

import pytest

from teamtr_verl.runs import kill_session, live_pids

# The leader starts a "worker" in its own process group (as Ray does for every worker), which starts an "engine"
# (as vLLM's server starts its EngineCore). Killing the leader's group alone would leave both.
LEADER = textwrap.dedent("""
    import subprocess, sys, time
    engine = "import time; time.sleep(600)"
    worker = f"import os, subprocess, sys, time; os.setpgid(0, 0); subprocess.Popen([sys.executable, '-c', {engine!r}]); time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", worker])
    time.sleep(600)
""")


def test_killing_a_run_kills_its_whole_session_not_only_its_process_group():
    leader = subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True)
    deadline = time.monotonic() + 30
    while len(live_pids(session=leader.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = live_pids(session=leader.pid)
    assert len(pids) == 3 and leader.pid in pids
    worker = next(pid for pid in pids if pid != leader.pid and live_pids(group=pid))  # leads its own group
    assert sorted(live_pids(group=leader.pid) + live_pids(group=worker)) == sorted(pids)  # the engine is in it
    kill_session(leader, timeout_s=30)
    assert live_pids(session=leader.pid) == [] and leader.returncode is not None


def test_a_process_that_leads_no_session_is_refused():
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with pytest.raises(ValueError, match="does not lead its own session"):
            kill_session(plain)
    finally:
        plain.kill(), plain.wait()


def test_a_benchmark_run_never_overwrites_an_earlier_runs_metrics(tmp_path, monkeypatch):
    """benchmarks/verl_runs.cached_main_ppo: metrics of another code or config are kept aside, a matching run reused."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import verl_runs

    started = []

    def fake_run(config_name, overrides, metrics):
        started.append(overrides)
        metrics.write_text(json.dumps({"step": 1, "data": {"run": len(started)}}) + "\n")
        return {1: {"run": len(started)}}, "rc=0 wall_s=1"

    monkeypatch.setattr(verl_runs, "run_main_ppo", fake_run)
    metrics = tmp_path / "n2_s0_teamtr.jsonl"
    assert verl_runs.cached_main_ppo("cfg", ["a=1"], metrics, 1) == ({1: {"run": 1}}, "rc=0 wall_s=1")
    assert verl_runs.cached_main_ppo("cfg", ["a=1"], metrics, 1)[0][1]["run"] == 1 and len(started) == 1  # reused
    verl_runs.cached_main_ppo("cfg", ["a=2"], metrics, 1)  # another config: runs again
    verl_runs.cached_main_ppo("cfg", ["a=3"], metrics, 1)  # and again, within the same second: a second name
    superseded = sorted(tmp_path.glob("n2_s0_teamtr.superseded-*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    assert len(started) == 3 and len(superseded) == 2
    assert [json.loads(p.read_text())["data"] for p in superseded] == [{"run": 1}, {"run": 2}]
    assert json.loads(metrics.read_text())["data"] == {"run": 3}

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

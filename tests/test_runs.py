"""teamtr_verl.runs: killing a run kills every process it started (what a fault drill relies on)."""

import subprocess
import sys
import textwrap
import time

from teamtr_verl.runs import kill_session, session_pids

# The leader starts a "worker" in its own process group (as Ray does for every worker), which starts an "engine"
# (as vLLM's server starts its EngineCore); each prints its pid. Killing the leader's group alone leaves both.
LEADER = textwrap.dedent("""
    import os, subprocess, sys, time
    engine = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
    worker = ("import os, subprocess, sys, time; os.setpgid(0, 0); print(os.getpid(), flush=True); "
              f"subprocess.Popen([sys.executable, '-c', {engine!r}]); time.sleep(600)")
    subprocess.Popen([sys.executable, "-c", worker])
    print(os.getpid(), flush=True)
    time.sleep(600)
""")


def test_killing_a_run_kills_its_whole_session_not_only_its_process_group():
    leader = subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True, stdout=subprocess.PIPE, text=True)
    pids = {int(leader.stdout.readline()) for _ in range(3)}  # leader, worker, engine (any order)
    deadline = time.monotonic() + 30
    while set(session_pids(leader.pid)) != pids and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(session_pids(leader.pid)) == pids and leader.pid in pids
    assert len({subprocess.check_output(["ps", "-o", "pgid=", "-p", str(pid)]).strip() for pid in pids}) == 2
    kill_session(leader, timeout_s=30)
    assert session_pids(leader.pid) == [] and leader.returncode is not None

"""End to end on two Ray nodes: a two-agent team in ``split`` placement puts each agent on its own node.

Starts its own Ray cluster of two raylets on this machine (``ray start --head`` plus ``ray start --address=...``),
each with exactly one logical device (the Ray ``GPU`` resource that the CPU platform's resource pools ask for) and
always tears it down again (only the process groups it started). Then the stock entry point, pointed at the cluster
with ``+ray_kwargs.ray_init.address``, trains the tiny team for one stage with ``trainer.nnodes=2``,
``trainer.n_gpus_per_node=1``. Proves, from the GCS actor table (the data behind Ray's state API, which keeps the
node of every actor after the job ended): the cluster had two alive nodes with one device each; each agent's FSDP
worker and its vLLM server ran on the same node, and the two agents on different nodes; the stage trained (its
TeamTR metrics were logged for both agents).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from teamtr_verl.fixtures import write_addition_dataset
from teamtr_verl.runs import live_pids, run_main_ppo, team_override

pytestmark = pytest.mark.e2e

NODE_CPUS = 8  # logical CPUs per raylet: 16 in all, as cpu_runtime.yaml gives the one-node cluster
NODE_OBJECT_STORE = 1 << 30  # 1 GiB each: Ray's default (30 % of RAM per node) would reserve 2 x 7 GiB of /dev/shm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _stop_groups(pgids: list[int], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, the process groups that ``ray start`` (each started in its own session) leads: a
    raylet, its GCS/agents and every worker it spawned. All groups at once; nothing outside them is touched.

    What ``ray stop --force`` does, restricted to this cluster (``ray stop`` would stop every Ray on the machine).
    The grace is short on purpose: after the job, a raylet drains for ~9 s on SIGTERM and the GCS ignores it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for pgid in pgids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(-pgid, os.WNOHANG)  # reap the ones that are our own children
            if not any(live_pids(group=pgid) for pgid in pgids):
                return
            time.sleep(0.5)


@contextlib.contextmanager
def two_node_cluster(log_dir: Path):
    """Yield ``(address, env, pgids)`` of a fresh two-raylet Ray cluster; stop both raylets' process groups at the
    end (``pgids`` names them, to check afterwards that nothing of the cluster survived).

    Token authentication, with a token made for this cluster, set for every process explicitly: Ray 2.60's
    ``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists, but a node or driver given an
    explicit address does not, and then fails with "InvalidAuthToken". ``env`` is what a driver needs to connect.
    Short temp dir: Ray's Unix socket paths must stay under 108 characters.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="teamtr2n_", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    per_node = ["--num-gpus=1", f"--num-cpus={NODE_CPUS}", f"--object-store-memory={NODE_OBJECT_STORE}",
                f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
    pgids: list[int] = []

    def start(name: str, *args: str) -> None:
        # Without --block, `ray start` returns once its node is up; its daemons stay in the session it leads.
        with open(log_dir / f"ray_start_{name}.log", "w") as log:
            process = subprocess.Popen([ray_cli, "start", *args, *per_node, f"--dashboard-agent-listen-port="
                                        f"{_free_port()}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            pgids.append(process.pid)  # start_new_session: its pid is the group's id
            if process.wait(timeout=180) != 0:
                raise RuntimeError(f"ray start ({name}) failed: {(log_dir / f'ray_start_{name}.log').read_text()}")

    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        start("head", "--head", f"--port={_free_port()}", "--include-dashboard=false",
              f"--ray-client-server-port={_free_port()}")
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        start("worker", f"--address={address}", "--include-log-monitor=false")  # one per machine: the head's
        yield address, env, pgids
    finally:
        _stop_groups(pgids)
        shutil.rmtree(temp_dir, ignore_errors=True)


# Run as a driver of the cluster after the job: the GCS's node table and actor table, dead actors included.
_QUERY = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"node_id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"],
          "head": "node:__internal_head__" in n["Resources"], "gpu": n["Resources"].get("GPU", 0),
          "cpu": n["Resources"].get("CPU", 0)} for n in ray.nodes()]
actors = [{"name": a["Name"], "cls": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"],
           "state": a["State"]} for a in ray._private.state.actors().values()]
print("PLACEMENT " + json.dumps({"nodes": nodes, "actors": actors}))
"""


def cluster_placement(address: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", _QUERY, address], env=env, capture_output=True, text=True,
                            timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("PLACEMENT "):])


@pytest.fixture(scope="module")
def two_node_run(tiny_team, tmp_path_factory):
    alice, bob = tiny_team
    data = write_addition_dataset(tmp_path_factory.mktemp("two_nodes_data") / "data", n_train=16, n_val=4)
    workdir = tmp_path_factory.mktemp("two_nodes_run")
    metrics_file = workdir / "metrics.jsonl"
    times = {"start": time.monotonic()}
    with two_node_cluster(workdir / "ray") as (address, env, pgids), pytest.MonkeyPatch.context() as mp:
        times["cluster_up"] = time.monotonic()
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"):
            mp.setenv(name, env[name])  # the driver (run_main_ppo's subprocess) connects with the cluster's token
        result, rows = run_main_ppo("teamtr_tiny_cpu", [
            team_override({"alice": alice, "bob": bob}),
            f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
            "trainer.total_training_steps=1", "trainer.nnodes=2", "trainer.n_gpus_per_node=1",
            f"+ray_kwargs.ray_init.address={address}",
            # an existing cluster brings its own resources: ray.init refuses num_cpus/num_gpus with an address
            "ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null",
            # the TaskRunner (which writes the metrics file) runs in a worker the driver did not start
            f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={metrics_file}",
        ], workdir, metrics_file=metrics_file)
        times["run_done"] = time.monotonic()
        placement = cluster_placement(address, env) if result.returncode == 0 else None
        times["queried"] = time.monotonic()
    times["torn_down"] = time.monotonic()
    leftover = [pgid for pgid in pgids if live_pids(group=pgid)]
    phases = {f"{b}_s": round(times[b] - times[a], 1) for a, b in zip(times, list(times)[1:])}
    phases["total_s"] = round(times["torn_down"] - times["start"], 1)
    (workdir / "placement.json").write_text(json.dumps({"placement": placement, "phases": phases}, indent=1))
    print(f"\ntwo-node cluster + run phases: {phases}")
    assert result.returncode == 0, f"see {workdir}/stderr.log\n{result.stderr[-4000:]}"
    return rows, placement, workdir, leftover


def test_each_agent_of_a_split_team_runs_on_its_own_node(two_node_run):
    _, placement, workdir, _ = two_node_run
    nodes = {n["node_id"]: n for n in placement["nodes"] if n["alive"]}
    role = {node_id: ("head" if n["head"] else "worker") for node_id, n in nodes.items()}
    assert len(nodes) == 2 and all(n["gpu"] == 1 for n in nodes.values()), placement["nodes"]
    actors = placement["actors"]

    def nodes_of(prefix: str) -> set[str]:
        return {a["node_id"] for a in actors if a["name"].startswith(prefix)}

    workers = {agent: nodes_of(f"teamtr_{agent}_") for agent in ("alice", "bob")}
    # replica ranks: alice owns global replica 0, bob 1 (teamtr_verl.topology.replica_rank_offsets)
    servers = {"alice": nodes_of("vllm_server_0_"), "bob": nodes_of("vllm_server_1_")}
    print(f"\ntwo-node placement ({workdir}):")
    for agent in ("alice", "bob"):
        print(f"  {agent}: FSDP worker on {[(role.get(n), n) for n in workers[agent]]}, "
              f"vLLM server on {[(role.get(n), n) for n in servers[agent]]}")
    for agent in ("alice", "bob"):
        assert len(workers[agent]) == 1 and workers[agent] <= nodes.keys(), (agent, workers)
        assert servers[agent] == workers[agent], (agent, servers, workers)  # a server sits beside its workers
    assert workers["alice"] != workers["bob"]


def test_the_stage_trained_both_agents(two_node_run):
    rows, _, _, _ = two_node_run
    stages = {step: m for step, m in rows.items() if "teamtr/stage/return_mean" in m}
    assert sorted(stages) == [1]
    metrics = stages[1]
    print(f"\nstage 1: timing_s/step={metrics.get('timing_s/step')}")
    assert metrics["timing_s/step"] > 0
    for agent in ("alice", "bob"):
        assert metrics[f"teamtr/{agent}/kl"] >= 0
        assert metrics[f"teamtr/{agent}/messages"] == 6  # 4 prompts x n=2, one of 4 prompts held out
        assert metrics[f"teamtr/{agent}/rollout_probs_diff_max"] < 1e-3  # each server holds its own actor's weights
    assert {metrics["teamtr/alice/position"], metrics["teamtr/bob/position"]} == {0, 1}


def test_the_cluster_is_gone_after_the_run(two_node_run):
    *_, leftover = two_node_run
    assert leftover == [], f"processes of the test's Ray cluster survived in process groups {leftover}"

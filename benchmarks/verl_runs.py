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

from teamtr_verl import runs
from teamtr_verl.runs import read_metrics, team_override  # noqa: F401 (the scripts import them from here)

HERE = Path(__file__).resolve().parent


def run_main_ppo(config_name: str, overrides: list[str], metrics: Path, timeout_s: int = 3600) -> tuple[dict, str]:
    """Run verl's entry point with ``config_name`` from teamtr_verl/configs plus ``overrides`` under peak_memory.py;
    return ({step: merged metrics}, the peak-memory line ``rc=... wall_s=... peak_tree_uss_gib=...``)."""
    metrics.unlink(missing_ok=True)
    result, rows = runs.run_main_ppo(config_name, ["trainer.resume_mode=disable", *overrides], metrics.parent,
                                     timeout=timeout_s, prefix=[sys.executable, str(HERE / "peak_memory.py"), "--"],
                                     metrics_file=metrics)
    if result.returncode != 0:
        raise SystemExit(f"{config_name} run failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    memory = [line for line in result.stdout.splitlines() if line.startswith("rc=")][-1]
    return rows, memory


def cached_main_ppo(config_name: str, overrides: list[str], metrics: Path, steps: int) -> tuple[dict, str]:
    """:func:`run_main_ppo`, unless an earlier invocation ran the same config, overrides and code (:func:`_commit`)
    to at least ``steps`` steps (``<metrics>.mem``: that key, then the memory line): an interrupted benchmark
    continues where it stopped. Only the first ``steps`` steps are returned. An earlier run's metrics that do not
    match are kept as ``<stem>.superseded-<mtime>.jsonl``, never overwritten."""
    key = json.dumps([config_name, overrides, _commit()])
    memory_file = metrics.with_suffix(".mem")
    cached = memory_file.read_text().splitlines() if memory_file.is_file() else []
    if cached[:1] == [key] and metrics.is_file() and len(read_metrics(metrics)) >= steps:
        rows = read_metrics(metrics)
        return {step: rows[step] for step in sorted(rows)[:steps]}, cached[1]
    memory_file.unlink(missing_ok=True)  # a run that fails now leaves no memory line of an earlier one
    if metrics.is_file() and metrics.stat().st_size:  # another code or config: keep the earlier run's metrics aside
        stamp, n = int(metrics.stat().st_mtime), 0
        while (aside := metrics.with_name(f"{metrics.stem}.superseded-{stamp}{f'-{n}' * bool(n)}{metrics.suffix}")).exists():
            n += 1
        metrics.rename(aside)
    rows, memory = run_main_ppo(config_name, overrides, metrics)
    memory_file.write_text(f"{key}\n{memory}\n")
    return rows, memory


def _commit() -> str:
    """The committed tree of teamtr_verl/ (the code a run exercises; a docs or benchmark-script commit keeps it),
    ``+dirty`` when it has uncommitted changes."""
    git = ["git", "-C", str(HERE.parent)]
    tree = subprocess.run([*git, "rev-parse", "HEAD:teamtr_verl"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "teamtr_verl"], capture_output=True).returncode != 0
    return tree + ("+dirty" if dirty else "")


def header_lines(title: str) -> list[str]:
    """The table heading: date, machine and versions."""
    import torch
    import verl
    import vllm

    return [f"## {title}", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- machine: {platform.machine()} {os.cpu_count()} logical CPUs, no GPU; python {platform.python_version()}, "
            f"torch {torch.__version__}, verl {verl.__version__}, vllm {vllm.__version__}", ""]


TASKS = {"relay": "teamtr_relay_cpu", "budget": "teamtr_budget_cpu"}  # task -> its CPU config


def team_run(task: str, team: Path, names: tuple[str, ...], seed: int, metrics: Path, stages: int,
             overrides: list[str], label: str) -> dict[int, dict]:
    """A ``task`` team (teamtr_verl.fixtures: relay or budget) built once per (names, seed) into ``team``, trained with
    the task's CPU config for ``stages`` stages; a run already finished with the same overrides and code is reused
    (:func:`cached_main_ppo`: an interrupted sweep continues where it stopped)."""
    from teamtr_verl.fixtures.budget import build_budget_team
    from teamtr_verl.fixtures.relay import build_relay_team

    if not (team / "data" / "train.parquet").is_file():
        {"relay": build_relay_team, "budget": build_budget_team}[task](team, names, seed=seed)
    rows, memory = cached_main_ppo(TASKS[task], [
        team_override({name: team / name for name in names}),
        f"data.train_files={team / 'data' / 'train.parquet'}", f"data.val_files={team / 'data' / 'test.parquet'}",
        f"data.seed={seed}", f"trainer.total_training_steps={stages}", *overrides,
    ], metrics, stages)
    print(f"{label}: {memory}", flush=True)
    return rows


def relay_run(team: Path, names: tuple[str, ...], seed: int, metrics: Path, stages: int, overrides: list[str],
              label: str) -> dict[int, dict]:
    """:func:`team_run` on the relay task (the demo's config)."""
    return team_run("relay", team, names, seed, metrics, stages, overrides, label)

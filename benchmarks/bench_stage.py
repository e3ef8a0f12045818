"""Time of a TeamTR stage split by phase, against the sum of its parts; peak memory; teamtr vs stale side by side.

    python benchmarks/bench_stage.py [--stages 4] [--schedules teamtr stale] [--out DIR]

Runs the stock entry point (``python -m verl.trainer.main_ppo``, config ``teamtr_tiny_cpu``) on two tiny agents
(alice: hidden 128; bob: hidden 64, own tokenizer), one run per schedule, one after the other, each under
benchmarks/peak_memory.py. Reads verl's file-logger metrics and prints a markdown table of the steady-state stages
(stage 1 holds vLLM's warm-up and is reported apart): per agent the time of generation, update (old log-probs +
update + KL check + line search) and sync, the stage's wall time (verl's ``timing_s/step``), and the overhead
ratio stage / sum of phases. Budget (issue): within 10 % of the sum; peak <= 12 GiB; a sync costs one agent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("gen_s", "update_s", "sync_s")


def run(schedule: str, stages: int, workdir: Path, models: tuple[Path, Path], data: Path) -> tuple[dict, str]:
    import teamtr_verl

    config_dir = Path(teamtr_verl.__file__).parent / "configs"
    metrics = workdir / f"{schedule}.jsonl"
    command = [
        sys.executable, str(HERE / "peak_memory.py"), "--", sys.executable, "-m", "verl.trainer.main_ppo",
        f"--config-path={config_dir}", "--config-name=teamtr_tiny_cpu",
        f"teamtr.agents=[{{name: alice, model: '{models[0]}'}}, {{name: bob, model: '{models[1]}'}}]",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        f"trainer.total_training_steps={stages}", "trainer.logger=[console,file]", f"teamtr.schedule={schedule}",
        "trainer.resume_mode=disable", f"trainer.default_local_dir={workdir / schedule}",
    ]
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{schedule} run failed:\n{result.stderr[-3000:]}")
    memory = [line for line in result.stdout.splitlines() if line.startswith("rc=")][-1]
    rows: dict[int, dict] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row["data"])
    return rows, memory


def table(schedule: str, rows: dict[int, dict], memory: str) -> list[str]:
    agents = ("alice", "bob")
    out = [f"### schedule `{schedule}` ({memory})", "",
           "| stage | " + " | ".join(f"{a} {p}" for a in agents for p in PHASES) + " | sum of phases | stage wall "
           "(timing_s/step) | overhead ratio |",
           "|---" * (2 + len(agents) * len(PHASES) + 2) + "|"]
    ratios = []
    for stage, data in sorted(rows.items()):
        parts = [data.get(f"teamtr/{a}/{p}", 0.0) for a in agents for p in PHASES]
        wall = data["timing_s/step"] - data.get("timing_s/save_checkpoint", 0.0)
        ratio = wall / sum(parts)
        if stage > 1:
            ratios.append(ratio)
        out.append(f"| {stage}{' (warm-up)' if stage == 1 else ''} | " + " | ".join(f"{v:.2f}" for v in parts)
                   + f" | {sum(parts):.2f} | {wall:.2f} | {ratio:.3f} |")
    out += ["", f"Median overhead ratio of stages 2..{max(rows)}: **{statistics.median(ratios):.3f}**", ""]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--schedules", nargs="+", default=["teamtr", "stale"])
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    from teamtr_verl.fixtures import build_tiny_model, write_addition_dataset

    import torch
    import verl

    workdir = Path(args.out or tempfile.mkdtemp(prefix="bench_stage_"))
    models = (build_tiny_model(workdir / "alice", seed=0),
              build_tiny_model(workdir / "bob", seed=1, hidden_size=64, num_heads=1))
    data = write_addition_dataset(workdir / "data", n_train=64, n_val=4)
    lines = ["## TeamTR stage time by phase (two tiny agents, CPU)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.machine()} {os.cpu_count()} logical CPUs; python {platform.python_version()}, "
             f"torch {torch.__version__}, verl {verl.__version__}",
             "- config teamtr_tiny_cpu: 4 prompts x n=2 per stage, chain of 2 turns, 16 tokens per message; seconds", ""]
    stage_walls = {}
    for schedule in args.schedules:
        rows, memory = run(schedule, args.stages, workdir, models, data)
        lines += table(schedule, rows, memory)
        stage_walls[schedule] = statistics.median(
            rows[s]["timing_s/step"] - rows[s].get("timing_s/save_checkpoint", 0.0) for s in rows if s > 1)
    if "teamtr" in stage_walls and "stale" in stage_walls:
        lines.append(f"Median stage wall time, teamtr / stale: {stage_walls['teamtr']:.2f} s / "
                     f"{stage_walls['stale']:.2f} s = **{stage_walls['teamtr'] / stage_walls['stale']:.2f}x** "
                     "(teamtr regenerates before each of the 2 updates, stale once per stage).")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

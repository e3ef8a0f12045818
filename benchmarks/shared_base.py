"""Peak memory and stage time of a team: every agent a full stack vs every agent a LoRA adapter on one shared base.

    python benchmarks/shared_base.py [--shared 2 4 8] [--full 2 3] [--stages 2] [--out FILE]

Each configuration is one stock ``python -m verl.trainer.main_ppo`` run of the tiny CPU team config (a chain of N
agents on the addition task, the same tiny model for every agent, the same prompts and batch), one after another in
this one invocation, under peak_memory.py (peak USS summed over the run's whole process tree: driver, Ray, FSDP
workers, vLLM engines). Full stacks: ``teamtr.placement=colocate`` on one logical device (each agent its own worker
group, vLLM server and copy of the weights). Shared base: ``teamtr.shared_base`` (one worker group, one vLLM server,
N adapters of rank 8). Stage time is the median of verl's ``timing_s/step`` over stages 2.. (stage 1 includes
compilation and the first weight sync). Prints a markdown section with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from verl_runs import header_lines, run_main_ppo

from teamtr_verl.fixtures import build_tiny_model, write_addition_dataset

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")


def overrides(mode: str, n: int, model: Path, data: Path, stages: int) -> list[str]:
    names = NAMES[:n]
    common = [f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
              f"trainer.total_training_steps={stages}", "trainer.n_gpus_per_node=1", "trainer.save_freq=-1",
              "trainer.test_freq=-1", "trainer.val_before_train=false"]
    if mode == "shared":
        agents = ", ".join(f"{{name: {name}}}" for name in names)
        return [f"teamtr.agents=[{agents}]", f"teamtr.shared_base={{model: '{model}', lora: {{rank: 8}}}}", *common]
    agents = ", ".join(f"{{name: {name}, model: '{model}'}}" for name in names)
    return [f"teamtr.agents=[{agents}]", "teamtr.placement=colocate", *common]


def measure(mode: str, n: int, model: Path, data: Path, stages: int, workdir: Path) -> dict:
    rows, memory = run_main_ppo("teamtr_tiny_cpu", overrides(mode, n, model, data, stages),
                                workdir / f"{mode}_{n}" / "metrics.jsonl")
    fields = dict(re.findall(r"(\w+)=([\d.]+)", memory))
    steps = [rows[step]["timing_s/step"] for step in sorted(rows) if "timing_s/step" in rows[step]]
    return {"mode": mode, "agents": n, "peak_uss_gib": float(fields["peak_tree_uss_gib"]),
            "wall_s": float(fields["wall_s"]), "stage_s": statistics.median(steps[1:] or steps),
            "stage1_s": steps[0]}


def report(results: list[dict]) -> str:
    lines = header_lines("Shared-base teams vs full stacks (benchmarks/shared_base.py)")
    lines += ["| mode | agents | peak USS (GiB) | × shared N = 2 | stage time after the first (s, median) | stage 1 (s) "
              "| run wall (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    reference = next((r["peak_uss_gib"] for r in results if r["mode"] == "shared" and r["agents"] == 2), None)
    for r in results:
        ratio = f"{r['peak_uss_gib'] / reference:.2f}" if reference else "-"
        lines.append(f"| {r['mode']} | {r['agents']} | {r['peak_uss_gib']:.2f} | {ratio} | {r['stage_s']:.1f} | "
                     f"{r['stage1_s']:.1f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=int, nargs="*", default=[2, 4, 8], help="team sizes on one shared base")
    parser.add_argument("--full", type=int, nargs="*", default=[2, 3], help="team sizes as full stacks")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the markdown section to this file")
    parser.add_argument("--workdir", default=None, help="keep the runs' logs and metrics here")
    args = parser.parse_args(argv)
    if max(args.shared + args.full) > len(NAMES):
        parser.error(f"at most {len(NAMES)} agents")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shared_base_bench_"))
    model = build_tiny_model(workdir / "model", seed=0)
    data = write_addition_dataset(workdir / "data", n_train=16, n_val=4)
    results = []
    for mode, sizes in (("full", args.full), ("shared", args.shared)):
        for n in sizes:
            results.append(measure(mode, n, model, data, args.stages, workdir))
            print(results[-1], flush=True)
    text = report(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ablation: the `teamtr`, `stale` and `happo` schedules on the relay task, for N = 2 and 3 agents and several seeds.

    python benchmarks/ablation.py [--agents 2 3] [--seeds 0 1 2] [--stages 6] [--out DIR]

Every run is the stock entry point (``python -m verl.trainer.main_ppo``, config ``teamtr_relay_cpu``) with
``teamtr.schedule`` set, on a relay team built by teamtr_verl.fixtures.relay: N=2 alice -> bob; N=3 alice -> bob ->
carol, where bob must pass alice's digit on and carol's best reply depends on what bob currently says. A seed sets the
models' initialisation, their warm start and the data order; the three schedules of one (N, seed) start from the same
team. Per regeneration: 16 prompts (N=2) or 18 (N=3: verl wants prompts x 8 samples divisible by the 3 devices) x 8
samples, 2 mini-batches (= gradient steps) per agent update. Runs whose metrics are complete in --out are reused, so an
interrupted ablation continues where it stopped.

Per run: final team return (mean of the last two stages' first regeneration), the measured-gain intervals with a
negative gain (coordination regressions; sampling noise included), the full update steps that left the KL region
(before the line search), the committed updates outside it, and the episodes generated. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from verl_runs import header_lines, relay_run

NAMES = ("alice", "bob", "carol")
SCHEDULES = ("teamtr", "stale", "happo")
PROMPTS = {2: 16, 3: 18}  # per regeneration, by team size


def run_one(out: Path, n_agents: int, seed: int, schedule: str, stages: int, prompts: int) -> dict[int, dict]:
    return relay_run(out / f"team_n{n_agents}_s{seed}", NAMES[:n_agents], seed,
                     out / f"n{n_agents}_s{seed}_{schedule}.jsonl", stages, [
        f"trainer.n_gpus_per_node={n_agents}", f"teamtr.schedule={schedule}", f"data.train_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts // 2}",
        # verl's fixed micro-batch path needs the rows to divide into micro-batches: one micro-batch per mini-batch
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={prompts // 2 * 8}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={prompts // 2 * 8}",
        f"trainer.default_local_dir={out / 'ckpt'}", f"trainer.experiment_name=ablation_n{n_agents}_s{seed}_{schedule}",
    ], f"n={n_agents} seed={seed} {schedule}")


def return_within_episodes(rows: dict[int, dict], episodes: int) -> float:
    """The team return measured last before more than ``episodes`` episodes had been generated (a stage's first
    regeneration measures the team that the episodes of the earlier stages trained)."""
    generated, measured = 0, rows[min(rows)]["teamtr/stage/return_mean"]
    for data in rows.values():
        if generated > episodes:
            break
        measured = data["teamtr/stage/return_mean"]
        generated += data["teamtr/stage/episodes"]
    return measured


def summarize_run(rows: dict[int, dict], names: tuple[str, ...]) -> dict:
    stages = list(rows.values())
    updates = len(stages) * len(names)
    return {
        "rows": rows,
        "final_return": statistics.mean(d["teamtr/stage/return_mean"] for d in stages[-2:]),
        "first_return": stages[0]["teamtr/stage/return_mean"],
        "negative": sum(d.get("teamtr/stage/negative_gains", 0) for d in stages),
        "measured": sum(d.get("teamtr/stage/gain_measurements", 0) for d in stages),
        "full_step_outside": sum(d.get(f"teamtr/{n}/out_of_region", 0) for d in stages for n in names) / updates,
        "committed_outside": sum(d.get("teamtr/stage/out_of_region", 0) for d in stages),
        "episodes": sum(d["teamtr/stage/episodes"] for d in stages),
        "stage_s": statistics.median(d["timing_s/step"] for d in stages[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--out", default="ablation_runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    lines = header_lines("Ablation: teamtr vs stale vs happo on the relay task")
    lines += [f"- budget per run: {args.stages} stages; per regeneration {PROMPTS} prompts (by N) x 8 samples; "
              f"lr 2e-3, delta 0.05, 2 mini-batches (gradient steps) per update; seeds {args.seeds}", "",
              "| N | schedule | seed | team return, stage 1 | final team return | negative measured gains | "
              "full steps outside delta | committed outside | episodes | median stage (s) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    means = []
    for n_agents in args.agents:
        per_schedule = {}
        for schedule in args.schedules:
            results = []
            for seed in args.seeds:
                result = summarize_run(run_one(out, n_agents, seed, schedule, args.stages, PROMPTS[n_agents]),
                                       NAMES[:n_agents])
                results.append(result)
                lines.append(f"| {n_agents} | {schedule} | {seed} | {result['first_return']:.3f} | "
                             f"{result['final_return']:.3f} | {result['negative']}/{result['measured']} | "
                             f"{result['full_step_outside']:.2f} | {result['committed_outside']} | "
                             f"{result['episodes']} | {result['stage_s']:.1f} |")
            per_schedule[schedule] = results
        # equal-budget view: teamtr generates more episodes per stage than stale/happo
        budget = min(sum(r["episodes"] for r in results) // len(results) for results in per_schedule.values())
        for schedule, results in per_schedule.items():
            finals = [r["final_return"] for r in results]
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            at_budget = statistics.mean(return_within_episodes(r["rows"], budget) for r in results)
            means.append(f"| {n_agents} | {schedule} | {statistics.mean(finals):.3f} ± {spread:.3f} | "
                         f"{at_budget:.3f} ({budget}) | "
                         f"{sum(r['negative'] for r in results)}/{sum(r['measured'] for r in results)} | "
                         f"{statistics.mean(r['full_step_outside'] for r in results):.2f} | "
                         f"{sum(r['episodes'] for r in results)} |")
    lines += ["", "Over seeds (final return: mean ± standard deviation over seeds):", "",
              "| N | schedule | final team return | return within equal episodes (budget) | negative measured gains | "
              "full steps outside delta | episodes |",
              "|---|---|---:|---:|---:|---:|---:|", *means]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

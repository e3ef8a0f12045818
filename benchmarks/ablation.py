"""Ablation: TeamTR against naive sequential fine-tuning through verl, at equal stages and at equal episodes.

    python benchmarks/ablation.py [--task budget|relay] [--agents 2 3 4] [--seeds 0 1 2]
                                  [--schedules teamtr stale matched happo] [--stages 8] [--out DIR] [--shared-base] [--lr LR]

Every run is the stock entry point (``python -m verl.trainer.main_ppo``, the task's CPU config) on a team built by
teamtr_verl.fixtures (relay, or budget-sq: the dense division-of-labour game where the occupancy-shift simulator
found stale updates costing return, docs/science.md). Schedules: ``teamtr`` (regenerate before every update),
``stale`` (one rollout per stage, every update on it), ``matched`` (teamtr with ``teamtr.prompts_per_update=split``:
update i regenerates only the i-th of N parts of the stage's prompts, so a stage generates as many episodes as a
stale one), ``happo`` (stale + the HAPPO importance factor). A seed sets the models' initialisation, warm start and
data order; the schedules of one (N, seed) start from the same team. Per stage: P prompts (16, or the next multiple
of N, for N=3 18) x 8 samples; 2 mini-batches per update. Runs whose metrics are complete in --out are reused, so an
interrupted ablation continues where it stopped.

Per run: team return of the first and the last two stages (each stage's first regeneration: under ``matched`` that is
the first part only), the measured-gain intervals with a negative gain (sampling noise included), full update steps
that left the KL region (before the line search), committed updates outside it, and the episodes generated; over
seeds, the final return and the return reached within the episodes the cheapest schedule used. A markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from verl_runs import TASKS, header_lines, team_run

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank")
SCHEDULES = {"teamtr": ["teamtr.schedule=teamtr"], "stale": ["teamtr.schedule=stale"],
             "matched": ["teamtr.schedule=teamtr", "teamtr.prompts_per_update=split"],
             "happo": ["teamtr.schedule=happo"]}


def prompts_for(n_agents: int) -> int:
    """Prompts per stage: 16, or 18 for N = 3 (verl wants prompts x 8 samples divisible by the N devices)."""
    return 16 if 16 * 8 % n_agents == 0 else 18


def run_one(task: str, out: Path, n_agents: int, seed: int, schedule: str, stages: int,
            shared_base: bool = False, lr: float | None = None) -> dict[int, dict]:
    prompts = prompts_for(n_agents)
    team, names = out / f"team_n{n_agents}_s{seed}", NAMES[:n_agents]
    # shared base: every agent a LoRA adapter of the first agent's warm start, one worker group and vLLM server
    layout = ([f"teamtr.agents=[{', '.join(f'{{name: {name}}}' for name in names)}]",
               f"teamtr.shared_base={{model: '{team / names[0]}', lora: {{rank: 8}}}}", "trainer.n_gpus_per_node=1"]
              if shared_base else [f"trainer.n_gpus_per_node={n_agents}"])
    tag = f"{'_shared' * shared_base}{f'_lr{lr:g}' if lr is not None else ''}"
    return team_run(task, team, names, seed, out / f"n{n_agents}_s{seed}_{schedule}{tag}.jsonl",
                    stages, [
        *layout, *SCHEDULES[schedule], *([f"actor_rollout_ref.actor.optim.lr={lr}"] if lr is not None else []),
        f"data.train_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts // 2}",
        # fixed micro-batches must divide a mini-batch (checked before Ray): one micro-batch per mini-batch
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={prompts // 2 * 8}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={prompts // 2 * 8}",
        f"trainer.default_local_dir={out / 'ckpt'}", f"trainer.experiment_name=ablation_{task}_n{n_agents}_s{seed}_{schedule}",
        # split placement asks 3 logical CPUs per device, +2 for TransferQueue, +1 spare (validation.validate_ray_cpus):
        # beyond the CPU runtime's 16 at N >= 5
        *([f"ray_kwargs.ray_init.num_cpus={3 * n_agents + 3}"] if n_agents >= 5 and not shared_base else []),
    ], f"{task} n={n_agents} seed={seed} {schedule}{' shared base' * shared_base}{f' lr {lr:g}' if lr is not None else ''}")


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
        # the line search commits only KL <= delta: a count above 0 is a bug (teamtr/stage/out_of_region counts the
        # full steps, before the line search)
        "committed_outside": sum(d.get(f"teamtr/{n}/committed", 0) == 1.0 and d[f"teamtr/{n}/kl"] > d[f"teamtr/{n}/delta"]
                                 for d in stages for n in names),
        "episodes": sum(d["teamtr/stage/episodes"] for d in stages),
        "stage_s": statistics.median(d["timing_s/step"] for d in stages[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="budget", choices=sorted(TASKS))
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 3, 4], choices=range(2, len(NAMES) + 1))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=["teamtr", "stale", "matched"], choices=list(SCHEDULES))
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--out", default="ablation_runs")
    parser.add_argument("--shared-base", action="store_true",
                        help="every agent a LoRA adapter (rank 8) of the first agent's warm start (teamtr.shared_base)")
    # a LoRA adapter moves far less per step than the full model at the same rate (docs/shared_base.md)
    parser.add_argument("--lr", type=float, default=None, help="every agent's actor lr (default: the config's)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    lines = header_lines(f"Ablation: {', '.join(args.schedules)} on the {args.task} task (teamtr_verl.fixtures"
                         f"{'; every agent a LoRA adapter of one base' if args.shared_base else ''})")
    lines += [f"- budget per run: {args.stages} stages; per stage {', '.join(f'N={n}: {prompts_for(n)}' for n in args.agents)}"
              f" prompts x 8 samples; the {TASKS[args.task]} config's delta, "
              f"{f'lr {args.lr:g}' if args.lr is not None else 'its lr'}, 2 mini-batches per update; "
              f"seeds {args.seeds}", "",
              "| N | schedule | seed | team return, stage 1 | final team return | negative measured gains | "
              "full steps outside delta | committed outside | episodes | median stage (s) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    means = []
    for n_agents in args.agents:
        per_schedule = {}
        for schedule in args.schedules:
            results = []
            for seed in args.seeds:
                result = summarize_run(run_one(args.task, out, n_agents, seed, schedule, args.stages, args.shared_base,
                                               args.lr),
                                       NAMES[:n_agents])
                results.append(result)
                lines.append(f"| {n_agents} | {schedule} | {seed} | {result['first_return']:.3f} | "
                             f"{result['final_return']:.3f} | {result['negative']}/{result['measured']} | "
                             f"{result['full_step_outside']:.2f} | {result['committed_outside']} | "
                             f"{result['episodes']} | {result['stage_s']:.1f} |")
            per_schedule[schedule] = results
        # equal-budget view: teamtr generates more episodes per stage than stale/happo/matched
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

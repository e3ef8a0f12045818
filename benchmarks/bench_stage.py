"""Time of a TeamTR stage split by phase, against the sum of its parts; peak memory; what each schedule generates.

    python benchmarks/bench_stage.py [--agents 2 3] [--stages 4] [--schedules teamtr stale] [--grpo] [--out DIR]
        [--closing | --no-closing]

Schedules (``--schedules``): ``stale``; ``teamtr`` (prefix reuse off); ``reuse`` / ``reuse_reversed`` (teamtr with
``teamtr.reuse_prefix=true``, update order fixed / reversed); ``matched`` (``teamtr.prompts_per_update=split``).

Runs the stock entry point (``python -m verl.trainer.main_ppo``) one run at a time, each under
benchmarks/peak_memory.py: config ``teamtr_tiny_cpu`` on N tiny agents (alice: hidden 128; bob: hidden 64, own
tokenizer; carol: hidden 128, a third tokenizer), one run per (N, schedule); with ``--grpo``, config ``grpo_tiny_cpu``:
stock verl GRPO steps of alice alone on the same prompts (6 prompts x n=2 per step, 16 tokens per message). Reads
verl's file-logger metrics and prints markdown tables of every stage (stage 1 holds vLLM's warm-up and is left out of
the medians): per agent the time of generation, update (old log-probs + update + KL check + line search) and sync,
the certificate's closing regeneration, the stage's wall time (verl's ``timing_s/step``), and the overhead ratio
stage / sum of phases; then the median stage
time of each run side by side with one GRPO step. Budget (issue): within 10 % of the sum; a sync costs one agent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from verl_runs import cached_main_ppo, header_lines, team_override

PHASES = ("gen_s", "update_s", "sync_s")
VARIANTS = {"stale": ["teamtr.schedule=stale"],
            "teamtr": ["teamtr.schedule=teamtr", "teamtr.reuse_prefix=false"],
            "reuse": ["teamtr.schedule=teamtr", "teamtr.reuse_prefix=true", "teamtr.order=fixed"],
            "reuse_reversed": ["teamtr.schedule=teamtr", "teamtr.reuse_prefix=true", "teamtr.order=reversed"],
            "matched": ["teamtr.schedule=teamtr", "teamtr.prompts_per_update=split"]}
AGENTS = {"alice": dict(seed=0), "bob": dict(seed=1, hidden_size=64, num_heads=1), "carol": dict(seed=2)}


def step_wall(data: dict) -> float:
    return data["timing_s/step"] - data.get("timing_s/save_checkpoint", 0.0)


def steady_median(rows: dict[int, dict]) -> float:
    return statistics.median(step_wall(d) for step, d in rows.items() if step > 1)


def phase_table(title: str, agents: list[str], rows: dict[int, dict], memory: str) -> list[str]:
    out = [f"### {title} ({memory})", "",
           "| stage | " + " | ".join(f"{a} {p}" for a in agents for p in PHASES) + " | closing gen_s | sum of phases | "
           "stage wall (timing_s/step) | overhead ratio |",
           "|---" * (3 + len(agents) * len(PHASES) + 2) + "|"]
    ratios = []
    for stage, data in rows.items():
        parts = [data.get(f"teamtr/{a}/{p}", 0.0) for a in agents for p in PHASES]
        parts.append(data.get("teamtr/stage/closing_gen_s", 0.0))  # the certificate's closing regeneration
        ratio = step_wall(data) / sum(parts)
        if stage > 1:
            ratios.append(ratio)
        out.append(f"| {stage}{' (warm-up)' if stage == 1 else ''} | " + " | ".join(f"{v:.2f}" for v in parts)
                   + f" | {sum(parts):.2f} | {step_wall(data):.2f} | {ratio:.3f} |")
    out += ["", f"Median overhead ratio of stages 2..{max(rows)}: **{statistics.median(ratios):.3f}**", ""]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2], choices=[2, 3])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--schedules", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--closing", action=argparse.BooleanOptionalAction, default=True,
                        help="the certificate's closing regeneration (adds one rollout to every schedule)")
    parser.add_argument("--grpo", action="store_true", help="also time stock GRPO steps of one agent, same prompts")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    from teamtr_verl.fixtures import build_tiny_model, write_addition_dataset

    workdir = Path(args.out or tempfile.mkdtemp(prefix="bench_stage_")).resolve()
    models = {name: build_tiny_model(workdir / name, **kwargs) for name, kwargs in AGENTS.items()}
    data = write_addition_dataset(workdir / "data", n_train=64, n_val=4)
    common = [f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
              f"trainer.total_training_steps={args.stages}",
              # 6 prompts x n=2 = 12 rows: divisible by 1, 2 and 3 devices (verl's check) and by one micro-batch
              "data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=6",
              "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=12",
              "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=12"]
    lines = header_lines("TeamTR stage time by phase (tiny agents, CPU)")
    lines += ["- config teamtr_tiny_cpu: 6 prompts x n=2 per regeneration, chain of N turns, <= 16 tokens per message, "
              "one logical device per agent, one mini-batch per update; GRPO: grpo_tiny_cpu on the same 6 prompts x n=2; "
              "seconds", ""]
    medians, generated = {}, {}
    for n_agents in args.agents:
        names = list(AGENTS)[:n_agents]
        for schedule in args.schedules:
            rows, memory = cached_main_ppo("teamtr_tiny_cpu", common + [
                team_override({name: models[name] for name in names}), f"trainer.n_gpus_per_node={n_agents}",
                *VARIANTS[schedule], f"teamtr.certificate.closing_regeneration={str(args.closing).lower()}",
                f"trainer.default_local_dir={workdir / f'n{n_agents}_{schedule}'}",
            ], workdir / f"n{n_agents}_{schedule}.jsonl", args.stages)
            print(f"N = {n_agents} {schedule}: {memory}", file=sys.stderr, flush=True)
            lines += phase_table(f"N = {n_agents}, schedule `{schedule}`", names, rows, memory)
            medians[f"N = {n_agents}, `{schedule}` stage"] = steady_median(rows)
            generated[(n_agents, schedule)] = (
                statistics.median(d["teamtr/stage/turns_generated"] for d in rows.values()),
                statistics.median(d["teamtr/stage/turns_reused"] for d in rows.values()),
                statistics.median(d["teamtr/stage/tokens_generated"] for d in rows.values()),
                steady_median(rows), memory.split("peak_tree_uss_gib=")[-1].split()[0])
    if args.grpo:
        rows, memory = cached_main_ppo("grpo_tiny_cpu", common + [
            f"actor_rollout_ref.model.path={models['alice']}", f"trainer.default_local_dir={workdir / 'grpo'}",
        ], workdir / "grpo.jsonl", args.stages)
        walls = ", ".join(f"{step_wall(d):.2f}" for d in rows.values())
        lines += [f"### one agent, stock GRPO ({memory})", "", f"Step wall times (s): {walls}", ""]
        medians["one stock verl GRPO step (alice alone)"] = steady_median(rows)
    reference = medians.get("one stock verl GRPO step (alice alone)")
    lines += ["### Side by side (medians of stages/steps 2..N, one run each, same prompts)", "",
              "| run | median stage / step (s) | vs N = 2 stale | vs one GRPO step |", "|---|---:|---:|---:|"]
    stale2 = medians.get("N = 2, `stale` stage")
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.2f} | {value / stale2 if stale2 else float('nan'):.2f} | "
                     f"{value / reference if reference else float('nan'):.2f} |")
    lines += ["", "### What a stage generates (medians over stages; turn = one agent message of one episode)", "",
              f"closing regeneration {'on' if args.closing else 'off'} in every run", "",
              "| N | schedule | turns generated | turns reused | tokens generated | turns vs stale | stage (s) | "
              "stage vs stale | peak USS (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (n_agents, schedule), (turns, reused, tokens, stage, memory) in generated.items():
        stale = generated.get((n_agents, "stale"))
        vs = (lambda a, b: f"{a / b:.2f}") if stale else (lambda a, b: "")
        lines.append(f"| {n_agents} | {schedule} | {turns:.0f} | {reused:.0f} | {tokens:.0f} | "
                     f"{vs(turns, stale[0]) if stale else ''} | {stage:.2f} | {vs(stage, stale[3]) if stale else ''} | "
                     f"{memory} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

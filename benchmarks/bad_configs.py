"""Time from start to the first error for bad TeamTR configs, through the stock entry point.

    python benchmarks/bad_configs.py [--out DIR]

Each case is ``python -m verl.trainer.main_ppo`` on ``teamtr_tiny_cpu`` with a good two-agent team and data, plus the
one bad override of the case. Prints, per case, the wall time until the process exited, its exit status, whether Ray
was started (a ``Started a local Ray instance`` line) and the error line the user sees. A markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from verl_runs import header_lines

from teamtr_verl.fixtures import build_tiny_model, write_addition_dataset
from teamtr_verl.runs import main_ppo_command, team_override


def cases(alice: Path, bob: Path, data: Path) -> list[tuple[str, list[str]]]:
    good = {"alice": alice, "bob": bob}
    return [
        ("missing train file", [f"data.train_files={data / 'nope.parquet'}"]),
        ("val files unset", ["data.val_files=null"]),
        ("agent model path does not exist", [team_override({"alice": alice, "bob": data / "no_model"})]),
        ("unknown agent key", ["teamtr.agents=[{name: alice, model: '%s', lr: 1}, {name: bob, model: '%s'}]"
                               % (alice, bob)]),
        ("delta <= 0", ["teamtr.delta=0"]),
        ("round robin with fewer turns than agents", ["teamtr.router={kind: round_robin, turns: 1}"]),
        ("split placement with too few devices", ["trainer.n_gpus_per_node=1"]),
        ("prompts_per_update=split with stale", ["teamtr.schedule=stale", "teamtr.prompts_per_update=split"]),
        ("resume_path that is no checkpoint", ["trainer.resume_mode=resume_path", "trainer.resume_from_path=/tmp/x"]),
        ("rollout.n = 1", ["actor_rollout_ref.rollout.n=1"]),
        ("micro-batch that does not divide a mini-batch", ["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16"]),
    ], good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bad_config_runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    alice = build_tiny_model(out / "alice", seed=0) if not (out / "alice" / "config.json").exists() else out / "alice"
    bob = build_tiny_model(out / "bob", seed=1) if not (out / "bob" / "config.json").exists() else out / "bob"
    data = write_addition_dataset(out / "data", n_train=16, n_val=4)
    all_cases, good = cases(alice, bob, data)
    # one stage at most: a case that slipped past the checks would otherwise train for the config's whole length
    base = [team_override(good), f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
            "trainer.total_training_steps=1", f"trainer.default_local_dir={out / 'ckpt'}"]
    lines = header_lines("Bad configs: time from start to the first error (stock entry point, teamtr_tiny_cpu)")
    lines += ["| bad input | exit | Ray started | seconds | what the user sees (last line of stderr) |",
              "|---|---:|---|---:|---|"]
    for label, overrides in all_cases:
        start = time.perf_counter()
        result = subprocess.run(main_ppo_command("teamtr_tiny_cpu", [*base, *overrides]), capture_output=True,
                                text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
        seconds = time.perf_counter() - start
        text = result.stdout + result.stderr
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["(nothing)"]
        ray = "yes" if "Started a local Ray instance" in text else "no"
        lines.append(f"| {label} | {result.returncode} | {ray} | {seconds:.1f} | `{last[0][:160]}` |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 0 (``teamtr.replace``, method aligned) on the tiny CPU team: the held-out KL curve of the distillation.

    python benchmarks/stage0_alignment.py [--epochs 8] [--topk 1024] [--out .demo/stage0]

A two-agent tiny team (the e2e fixture's alice and bob, addition task) is trained for one stage with
``teamtr_tiny_cpu``; then bob is swapped, from that checkpoint, for each newcomer below with δ₀ = 1e-9 (never reached)
and ``max_epochs`` = --epochs, so the run trains every epoch and is refused, printing the held-out KL curve
KL(π_incumbent ‖ π_new) per message (k3). Newcomers, all with bob's tokenizer:

* ``random``: another initialisation and size (seed 2, 3 layers instead of 2);
* ``near copy``: bob's initial weights plus Gaussian noise of 0.02 x each tensor's std;
* ``noisy copy``: the trained incumbent (the checkpoint's bob) plus noise of 0.2 x std (built like the e2e test's newcomer; that
  test's incumbent was trained differently, so its KLs differ).

The curve says whether the distillation (top-k forward KL from the incumbent's next-token distributions on the
probe's training messages; ``--topk 1024`` is the whole vocabulary of the tiny models: the exact KL) moves the
newcomer toward the incumbent on contexts it did not train on.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from verl_runs import header_lines

from teamtr_verl.fixtures import build_tiny_model, perturbed_copy, write_addition_dataset
from teamtr_verl.runs import run_main_ppo, team_override

CURVE = re.compile(r"not aligned within (\d+) steps: KL \S+ > delta0 \S+ \(curve ([^)]*)\)")
# The newcomer's stack runs beside the team's: a third device, and 6 prompts x n=2 divisible by 3.
STAGE0_RUN = ["trainer.n_gpus_per_node=3", "ray_kwargs.ray_init.num_cpus=24", "data.train_batch_size=6"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(".demo/stage0"))
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    alice, bob = build_tiny_model(out / "alice", seed=0), build_tiny_model(out / "bob", seed=1, hidden_size=64,
                                                                           num_heads=1)
    data = write_addition_dataset(out / "data", n_train=16, n_val=4)
    team = [team_override({"alice": alice, "bob": bob}), f"data.train_files={data / 'train.parquet'}",
            f"data.val_files={data / 'test.parquet'}"]
    result, _ = run_main_ppo("teamtr_tiny_cpu", [*team, "trainer.total_training_steps=1", "trainer.save_freq=1",
                                                 "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
                                                 f"trainer.default_local_dir={out / 'ckpt'}"], out / "base")
    if result.returncode != 0:
        raise SystemExit(f"the base run failed: see {out / 'base'}")
    newcomers = {
        "random (seed 2, 3 layers)": build_tiny_model(out / "random", seed=2, hidden_size=64, num_heads=1,
                                                      num_layers=3, tokenizer_dir=bob),
        "near copy (noise 0.02 std)": perturbed_copy(bob, out / "near_copy", 0.02, seed=3),
        "noisy copy of the trained bob (0.2 std)": perturbed_copy(
            out / "ckpt" / "global_step_1" / "bob" / "huggingface", out / "noisy_copy", 0.2, seed=3, tokenizer_dir=bob),
    }
    lines = [*header_lines("Stage 0: held-out KL(incumbent || newcomer) per message, by alignment epoch"),
             f"- tiny team (alice 427k, bob hidden 64), one stage of teamtr_tiny_cpu, then bob swapped; lr "
             f"{1e-3:g} (the config's), top-k {args.topk}, mini-batches of 8 messages, {args.epochs} epochs, δ₀ = "
             "1e-9 (never reached: every epoch runs); probe: "
             "6 prompts x n=2 = 12 bob messages, a quarter of the prompt groups held out to measure on", "",
             "| newcomer | epoch 0 | min (epoch) | last | curve |", "|---|---|---|---|---|"]
    for label, model in newcomers.items():
        work = out / f"swap_{model.name}"
        result, _ = run_main_ppo("teamtr_tiny_cpu", [
            *team, *STAGE0_RUN, "trainer.total_training_steps=2", "trainer.resume_mode=resume_path",
            f"trainer.resume_from_path={out / 'ckpt' / 'global_step_1'}", f"trainer.default_local_dir={work / 'ckpt'}",
            f"teamtr.replace={{agent: bob, model: '{model}', delta0: 1.0e-9, max_epochs: {args.epochs}, "
            f"topk: {args.topk}}}"], work)
        match = CURVE.search(result.stderr)
        if match is None:
            raise SystemExit(f"{label}: no refusal with a curve in {work / 'stderr.log'}")
        curve = [float(v) for v in match.group(2).split(", ")]
        best = min(range(len(curve)), key=curve.__getitem__)
        lines.append(f"| {label} | {curve[0]:.4g} | {curve[best]:.4g} ({best}) | {curve[-1]:.4g} | "
                     f"{', '.join(f'{v:.3g}' for v in curve)} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Plug-and-play replacement on the relay task (issue 13, item 5): swap bob for another model three ways.

    python benchmarks/swap_demo.py [--stages 4] [--after 3] [--arms none direct aligned mixture]
                                   [--tokenizer team|own] [--out .demo/swap]

A two-agent relay team (the demo's, ``teamtr_relay_cpu``, 24 prompts per stage so 3 devices divide the episodes)
trains ``--stages`` stages with TeamTR. From that checkpoint, continuations of ``--after`` stages each:

* ``none``: the same team goes on (the control);
* ``direct``: bob's model is swapped for the newcomer as is (``teamtr.replace`` method=direct);
* ``aligned``: the same newcomer, after Stage 0 (method=aligned, defaults: δ₀ = bob's δ, top-k 64, 20 epochs);
* ``mixture``: the same, distilled toward the geometric mixture of newcomer and incumbent (target=mixture; needs
  the team's tokenizer).

The newcomer is another size (hidden 192, 3 heads instead of 128, 2), another init (seed 7) and warm-started on the
relay task like the team's agents were before their TeamTR stages, with the team's tokenizer or (``--tokenizer own``)
its own, trained on the relay text with another vocabulary size (384 instead of 512: Stage 0 then re-tokenizes the
probe and trains on the incumbent's messages' likelihood). Printed: the team return
of each stage's first regeneration (for the first stage after the swap: the team with the newcomer, before any update
of that stage), the Stage-0 KL curve, and the swap's paired gain (same prompts and seeds as the probe).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from verl_runs import header_lines

from teamtr_verl.fixtures.relay import WarmStart, build_relay_team, warm_start
from teamtr_verl.runs import run_main_ppo, team_override

CURVE = re.compile(r"Stage 0: aligned after (\d+) steps: KL (\S+) <= delta0 (\S+) \(curve ([^)]*)\)")
REFUSED = re.compile(r"not aligned within (\d+) steps: KL \S+ > delta0 \S+ \(curve ([^)]*)\)")
STAGE = ["data.train_batch_size=24", "ray_kwargs.ray_init.num_cpus=24"]


def build_newcomer(team: Path, out: Path, own_tokenizer: bool = False) -> Path:
    """A differently sized, differently initialised bob, warm-started on the relay task, with the team's tokenizer
    or its own (trained on the relay text, another vocabulary size)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from teamtr_verl.fixtures import build_tiny_model, build_tokenizer
    from teamtr_verl.fixtures.relay import relay_corpus

    tokenizer_dir = team / "bob"
    if own_tokenizer:
        tokenizer_dir = out.with_name(out.name + "_tokenizer")
        build_tokenizer(384, relay_corpus(["alice", "bob"], seed=7), seed=7).save_pretrained(str(tokenizer_dir))
    init = build_tiny_model(out.with_name(out.name + "_init"), seed=7, vocab_size=512, hidden_size=192, num_heads=3,
                            tokenizer_dir=tokenizer_dir)
    model, tokenizer = Qwen2ForCausalLM.from_pretrained(str(init)), AutoTokenizer.from_pretrained(str(init))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        losses = warm_start(model, tokenizer, ["alice", "bob"], 1, WarmStart(), seed=7)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    print(f"newcomer: {sum(p.numel() for p in model.parameters())} params, warm-start loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--after", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=("none", "direct", "aligned", "mixture"),
                        default=["none", "direct", "aligned"])
    parser.add_argument("--tokenizer", choices=("team", "own"), default="team",
                        help="the newcomer's tokenizer: the team's, or its own (another vocabulary)")
    parser.add_argument("--out", type=Path, default=Path(".demo/swap"))
    args = parser.parse_args()
    if "mixture" in args.arms and args.tokenizer == "own":
        parser.error("--arms mixture needs --tokenizer team: a geometric mixture needs one vocabulary")
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    team = out / "team"
    build_relay_team(team)
    newcomer = build_newcomer(team, out / "bob_v2", own_tokenizer=args.tokenizer == "own")
    common = [team_override({"alice": team / "alice", "bob": team / "bob"}), *STAGE,
              f"data.train_files={team / 'data' / 'train.parquet'}", f"data.val_files={team / 'data' / 'test.parquet'}"]
    result, base = run_main_ppo("teamtr_relay_cpu", [
        *common, f"trainer.total_training_steps={args.stages}", f"trainer.save_freq={args.stages}",
        "trainer.resume_mode=disable", f"trainer.default_local_dir={out / 'ckpt'}"], out / "base", timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"the base run failed: see {out / 'base'}")
    arms = {"none": [], "direct": [f"teamtr.replace={{agent: bob, model: '{newcomer}', method: direct}}"],
            "aligned": [f"teamtr.replace={{agent: bob, model: '{newcomer}'}}", "trainer.n_gpus_per_node=3"],
            "mixture": [f"teamtr.replace={{agent: bob, model: '{newcomer}', target: mixture}}",
                        "trainer.n_gpus_per_node=3"]}
    arms = {arm: arms[arm] for arm in dict.fromkeys(args.arms)}  # run (and print) in the order given
    rows, logs = {}, {}
    for arm, extra in arms.items():
        work = out / arm
        result, rows[arm] = run_main_ppo("teamtr_relay_cpu", [
            *common, *extra, f"trainer.total_training_steps={args.stages + args.after}", "trainer.resume_mode=resume_path",
            f"trainer.resume_from_path={out / 'ckpt' / f'global_step_{args.stages}'}",
            f"trainer.default_local_dir={work / 'ckpt'}"], work, timeout=3600)
        logs[arm] = result.stdout + result.stderr
        if result.returncode != 0 and not REFUSED.search(logs[arm]):
            raise SystemExit(f"{arm}: the run failed: see {work}")
    after = list(range(args.stages + 1, args.stages + args.after + 1))
    lines = [*header_lines("Replacing bob on the relay task: " + " / ".join(arms)),
             f"- relay team (teamtr_relay_cpu, 24 prompts x n=8 per stage), {args.stages} TeamTR stages, then "
             f"{args.after} more per arm; newcomer: hidden 192 (bob: 128), seed 7, relay warm start, "
             + ("the team's tokenizer" if args.tokenizer == "team" else "its own tokenizer (vocabulary 384, the "
                "team's 512: Stage 0 re-tokenizes)"),
             "- team return (each stage's first regeneration) over the base stages: "
             + ", ".join(f"{base[s]['teamtr/stage/return_mean']:.3f}" for s in sorted(base)), "",
             "| arm | " + " | ".join(f"stage {s}" for s in after) + " | Stage 0 |",
             "|---|" + "---|" * (len(after) + 1)]
    for arm in arms:
        cells = [f"{rows[arm][s]['teamtr/stage/return_mean']:.3f}" if s in rows[arm] else "-" for s in after]
        stage0 = ""
        if arm in ("aligned", "mixture"):
            aligned, refused = CURVE.search(logs[arm]), REFUSED.search(logs[arm])
            first = rows[arm].get(after[0], {})
            if aligned:
                stage0 = (f"aligned in {aligned.group(1)} epochs, KL curve {aligned.group(4)} (δ₀ {aligned.group(3)}); "
                          f"return with the incumbent (probe) {first.get('teamtr/stage0/return_incumbent', float('nan')):.3f}, "
                          f"swap's paired gain {first.get('teamtr/stage0/crn_gain', float('nan')):+.3f} "
                          f"± {first.get('teamtr/stage0/crn_gain_se', float('nan')):.3f}, "
                          f"{first.get('teamtr/stage0/seconds', float('nan')):.0f} s, incumbent released "
                          f"({first.get('teamtr/stage0/released_gib', float('nan')):.2f} GiB)"
                          + (f", mean t {first.get('teamtr/stage0/mixture_t', float('nan')):.3f}"
                             if arm == "mixture" else "")
                          + (f", re-tokenized ({first.get('teamtr/stage0/untranslated_messages', 0):.0f} messages "
                             "left out)" if first.get("teamtr/stage0/retokenized") else ""))
            elif refused:
                stage0 = f"refused after {refused.group(1)} epochs, KL curve {refused.group(2)}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {stage0} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

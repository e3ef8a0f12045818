"""Curves of a TeamTR run from verl's file-logger metrics or a saved console output.

    python -m teamtr_verl.plot RUN_DIR_OR_METRICS.jsonl_OR_CONSOLE.log -o out.png

Panels: each agent's KL per update against its δ (committed and full-step), each agent's β, the team return, the
certificate against the paired gain (cumulative, per update), and the time of each stage split by phase and agent.
A directory is searched for ``*.jsonl`` metrics files (the newest is used). A resumed run's metrics file is drawn as
one run, each stage once (see :func:`teamtr_verl.summary.load_stages`).
"""

from __future__ import annotations

import argparse
import sys
from itertools import accumulate
from pathlib import Path

from teamtr_verl.summary import agents_of, load_stages, measured_pairs, update_records

PANELS = ("KL per update vs δ", "β per agent", "team return", "certificate vs paired gain (per update)", "stage time by phase")
PHASES = ("gen_s", "update_s", "sync_s")


def find_metrics(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.rglob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"{path} holds no *.jsonl metrics file: run with trainer.logger='[console,file]'")
        return candidates[-1]
    return path


def plot(metrics_path: str | Path, out: str | Path) -> list[str]:
    """Draw the panels into ``out`` (PNG); return the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = load_stages(find_metrics(metrics_path))
    steps = list(stages)
    agents = agents_of(stages)
    series = lambda key: [stages[s].get(key, float("nan")) for s in steps]  # noqa: E731

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    kl_ax, beta_ax, ret_ax, cert_ax, time_ax = axes
    for agent in agents:
        line, = kl_ax.plot(steps, series(f"teamtr/{agent}/kl"), marker="o", label=f"{agent} committed")
        kl_ax.plot(steps, series(f"teamtr/{agent}/kl_proposal"), ls=":", color=line.get_color(),
                   label=f"{agent} full step")
        kl_ax.plot(steps, series(f"teamtr/{agent}/delta"), ls="--", color=line.get_color(), label=f"{agent} δ")
        beta_ax.plot(steps, series(f"teamtr/{agent}/beta"), marker="o", label=agent)
    kl_ax.set_yscale("log")
    ret_ax.plot(steps, series("teamtr/stage/return_mean"), marker="o")
    pairs = [(p["bound"], p["gain"]) for p in measured_pairs(update_records(stages))]
    if pairs:  # per measured pair, in order: the cumulative bound under the cumulative paired gain (paper Fig. 4b)
        index = list(range(1, len(pairs) + 1))
        cert_ax.plot(index, list(accumulate(b for b, _ in pairs)), marker="o", label="Σ bound")
        cert_ax.plot(index, list(accumulate(g for _, g in pairs)), marker="s", label="Σ paired gain")
    bottom = [0.0] * len(steps)
    for agent in agents:
        for phase in PHASES:
            values = [v if v == v else 0.0 for v in series(f"teamtr/{agent}/{phase}")]
            time_ax.bar(steps, values, bottom=bottom, label=f"{agent} {phase[:-2]}")
            bottom = [b + v for b, v in zip(bottom, values)]
    for ax, title in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("update" if ax is cert_ax else "stage")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [ax.get_title() for ax in axes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teamtr_verl.plot", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", help="a run directory, verl's file-logger metrics (.jsonl) or a console log")
    parser.add_argument("-o", "--out", default="teamtr_run.png")
    args = parser.parse_args(argv)
    try:
        plot(args.metrics, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"teamtr-verl: {error}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

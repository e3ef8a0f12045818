"""A short, honest summary of a TeamTR run, read from verl's file-logger metrics (``trainer.logger=[...,file]``)
or from a saved console output (``trainer.logger=[console]``).

    python -m teamtr_verl.summary METRICS.jsonl|CONSOLE.log
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from statistics import mean, variance
from typing import Optional


# verl's console logger: "step:3 - key:value - key:value ..." (behind Ray's "(TaskRunner pid=...)" prefix in a log)
_CONSOLE_STEP = re.compile(r"step:(\d+) - (.*)$")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")  # e.g. np.float64(2.0), as verl prints numpy scalars


def _console_value(text: str) -> Optional[float]:
    match = _NUMPY_SCALAR.match(text)
    try:
        return float(match.group(1) if match else text)
    except ValueError:
        return None  # a non-numeric value (a string metric): not plotted


def parse_console_log(text: str) -> list[tuple[int, dict]]:
    """(step, metrics) for every console-logger line of a saved verl console output."""
    rows = []
    for line in text.splitlines():
        match = _CONSOLE_STEP.search(line)
        if match is None:
            continue
        data = {}
        for item in match.group(2).split(" - "):
            key, sep, value = item.partition(":")
            number = _console_value(value.strip()) if sep else None
            if number is not None:
                data[key.strip()] = number
        rows.append((int(match.group(1)), data))
    return rows


def load_stages(metrics_file: str | Path) -> dict[int, dict]:
    """Per verl step (= TeamTR stage), the merged metrics of that step's lines: verl's file-logger JSONL, or a saved
    console output (any other file)."""
    path = Path(metrics_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run with trainer.logger='[console,file]' "
                                "and VERL_FILE_LOGGER_PATH (or look under <project>/<experiment>.jsonl)")
    if path.suffix == ".jsonl":
        rows = [(int(row["step"]), row["data"]) for row in map(json.loads, path.read_text().splitlines())]
    else:
        rows = parse_console_log(path.read_text(errors="replace"))
    stages: dict[int, dict] = {}
    for step, data in rows:
        stages.setdefault(step, {}).update(data)
    stages = {step: data for step, data in stages.items() if "teamtr/stage/return_mean" in data}
    if not stages:
        raise ValueError(f"{path} holds no teamtr/stage/* metrics: is it the metrics file of a trainer_mode=teamtr run?")
    return dict(sorted(stages.items()))


def agents_of(stages: dict[int, dict]) -> list[str]:
    names = {key.split("/")[1] for data in stages.values() for key in data
             if key.startswith("teamtr/") and key.count("/") == 2 and key.split("/")[1] not in ("stage", "rollout")}
    return sorted(names)


def return_verdict(returns: list[float], window: int = 3) -> str:
    """Did the team return improve? Compares the mean of the first and last ``window`` stages against twice the
    standard error of that difference, estimated from the stage-to-stage spread inside the two windows."""
    if len(returns) < 2 * window:
        return f"verdict: too few stages ({len(returns)}) to judge an improvement (needs {2 * window})"
    head, tail = returns[:window], returns[-window:]
    diff = mean(tail) - mean(head)
    noise = 2 * math.sqrt((variance(head) + variance(tail)) / window)  # sample variances (n - 1)
    words = ("improved" if diff > noise else "got worse" if diff < -noise
             else "did NOT improve measurably in this budget")
    return (f"verdict: the team return {words} (first {window} stages {mean(head):.3f}, last {window} "
            f"{mean(tail):.3f}, difference {diff:+.3f} vs 2 standard errors {noise:.3f})")


def summarize(stages: dict[int, dict]) -> str:
    first, last = stages[min(stages)], stages[max(stages)]
    lines = [f"TeamTR run: {len(stages)} stages"]
    start, end = first["teamtr/stage/return_mean"], last["teamtr/stage/return_mean"]
    lines.append(f"  team return (mean over each stage's first regeneration): {start:.3f} -> {end:.3f} "
                 f"(change {end - start:+.3f})")
    lines.append("  " + return_verdict([d["teamtr/stage/return_mean"] for d in stages.values()]))
    for agent in agents_of(stages):
        kls = [d[f"teamtr/{agent}/kl"] for d in stages.values() if f"teamtr/{agent}/kl" in d]
        deltas = [d[f"teamtr/{agent}/delta"] for d in stages.values() if f"teamtr/{agent}/delta" in d]
        committed = sum(d.get(f"teamtr/{agent}/committed", 0) for d in stages.values())
        backtracks = sum(d.get(f"teamtr/{agent}/backtracks", 0) for d in stages.values())
        outside = sum(d.get(f"teamtr/{agent}/out_of_region", 0) for d in stages.values())
        lines.append(
            f"  {agent}: KL per update max {max(kls):.4g} vs delta {max(deltas):.4g}; {int(committed)}/{len(kls)} "
            f"updates committed; {int(outside)} full steps left the region; {int(backtracks)} backtracks; "
            f"beta {last.get(f'teamtr/{agent}/beta', math.nan):.3g}"
        )
    cert = last.get("teamtr/stage/certificate_sum")
    gain = last.get("teamtr/stage/measured_gain_sum")
    if cert is not None and gain is not None:
        lines.append(f"  certificate (sum of stage bounds) {cert:.4f} vs measured gain (sum) {gain:.4f}; "
                     f"calibration {last.get('teamtr/stage/calibration', math.nan):.2f}, "
                     f"rank correlation {last.get('teamtr/stage/rank_correlation', math.nan):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(summarize(load_stages(argv[0])))
    except (FileNotFoundError, ValueError) as error:
        print(f"teamtr-verl: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A short, honest summary of a TeamTR run, read from verl's file-logger metrics (``trainer.logger=[...,file]``)
or from a saved console output (``trainer.logger=[console]``). A resumed run, appended to the same file, reads as one.

    python -m teamtr_verl.summary METRICS.jsonl|CONSOLE.log
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from statistics import mean, median, variance
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


STAGE_KEY = "teamtr/stage/return_mean"  # present on the line of every logged TeamTR stage


def parse_metrics_jsonl(text: str) -> list[tuple[int, dict]]:
    """(step, data) for every line of verl's file-logger JSONL. A line that is not whole JSON (the last line of a run
    killed while writing it) is skipped: the run that resumed after it is still readable."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), row["data"]))
        except (ValueError, TypeError, KeyError):
            continue
    return rows


def occurrences(rows: list[tuple[int, dict]]) -> list[tuple[int, dict, bool]]:
    """Group logged lines into occurrences of a step: ``(step, merged data, restarts)``, in file order.

    verl may log one step in several consecutive lines (e.g. its validation metrics), each with its own keys: those
    merge. A resumed run appends to the same file, so a step can occur again: a line whose step is lower than the
    previous line's, or equal to it but repeating a key already logged for it, starts a new occurrence that
    ``restarts`` the run from that step.
    """
    grouped: list[tuple[int, dict, bool]] = []
    for step, data in rows:
        if grouped:
            last_step, last_data, _ = grouped[-1]
            if step == last_step and not last_data.keys() & data.keys():
                last_data.update(data)
                continue
        restarts = bool(grouped) and step <= grouped[-1][0]
        grouped.append((step, dict(data), restarts))
    return grouped


def load_stages(metrics_file: str | Path) -> dict[int, dict]:
    """Per verl step (= TeamTR stage), the metrics of that step: verl's file-logger JSONL, or a saved console output
    (any other file).

    A resumed run (or a new run logged into the same file) is read as one run: where it restarts from step s, the
    stages the earlier run logged after s are dropped (the resumed run redoes them from s's checkpoint), and each
    stage is the latest occurrence of it, whole (the keys of two occurrences are never mixed). An occurrence
    without teamtr stage metrics (the validation verl runs at the resume step) is not a stage.
    """
    path = Path(metrics_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run with trainer.logger='[console,file]' "
                                "and VERL_FILE_LOGGER_PATH (or look under <project>/<experiment>.jsonl)")
    if path.suffix == ".jsonl":
        rows = parse_metrics_jsonl(path.read_text(errors="replace"))
    else:
        rows = parse_console_log(path.read_text(errors="replace"))
    stages: dict[int, dict] = {}
    for step, data, restarts in occurrences(rows):
        if restarts:
            stages = {s: d for s, d in stages.items() if s <= step}
        if STAGE_KEY in data:
            stages[step] = data
    if not stages:
        raise ValueError(f"{path} holds no teamtr/stage/* metrics: is it the metrics file of a trainer_mode=teamtr run?")
    return dict(sorted(stages.items()))


def agents_of(stages: dict[int, dict]) -> list[str]:
    """The trained agents of a run: those with an update KL (``teamtr/<agent>/kl``); a frozen agent swapped by
    ``teamtr.replace`` has only ``teamtr/<agent>/replaced``, and ``teamtr/stage0/...`` is the swap's own namespace."""
    names = {key.split("/")[1] for data in stages.values() for key in data
             if key.startswith("teamtr/") and key.count("/") == 2 and key.endswith("/kl")
             and key.split("/")[1] not in ("stage", "rollout", "stage0")}
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
    report = certificate_report([stages])
    if report["updates"]:
        lines.append(
            f"  certificate: {report['updates']} (bound, paired gain) pairs (a pair: the updates between two "
            f"regenerations); calibration {report['calibration']:.2f} (gain >= bound), {report['calibration_noisy']:.2f} "
            f"counting the gain's own noise (gain + 1.645 SE >= bound; a 95 % bound scores >= 0.90), Spearman "
            f"{report['spearman']:.2f} per pair, "
            f"{report['spearman_cumulative']:.2f} cumulative; sum of bounds {report['bound_sum']:+.4f} vs paired gains "
            f"{report['gain_sum']:+.4f} ± {report['gain_sum_se']:.4f}"
            + (f" (in-sample, on the trained episodes: {report['gain_train_sum']:+.4f})"
               if math.isfinite(report["gain_train_sum"]) else ""))
        lines.append(
            f"  gain estimates: median SE paired (CRN) {report['se_paired']:.4f}, importance-sampled (held-out) "
            f"{report['se_is']:.4f}; backtracks per update {report['backtracks']:.2f}; committed KL used "
            f"{report['delta_used']:.0%} of delta (median)")
    return "\n".join(lines)


def update_records(stages: dict) -> list[dict]:
    """One record per agent update that has a bound and a paired gain (teamtr schedule: one update per pair)."""
    records = []
    for step, data in stages.items():
        for agent in agents_of({step: data}):
            p = f"teamtr/{agent}/"
            if p + "committed" not in data:
                continue
            records.append({"stage": step, "agent": agent, "committed": data[p + "committed"],
                            "bound": data.get(p + "bound"), "gain": data.get(p + "crn_gain"),
                            "gain_train": data.get(p + "crn_gain_train"), "pair": data.get(p + "crn_pair"),
                            "se_paired": data.get(p + "crn_gain_se"), "se_is": data.get(p + "is_gain_se"),
                            "backtracks": data.get(p + "backtracks", 0.0), "delta_used": data.get(p + "delta_used"),
                            "position": data.get(p + "position", 0)})
    return sorted(records, key=lambda r: (r["stage"], r["position"]))


def measured_pairs(records: list[dict]) -> list[dict]:
    """The (bound, paired gain) pairs of one run's update records, as the trainer's ledger forms them: the updates
    made between two regenerations share one paired gain (stale: a whole stage), so they make one pair whose bound
    is the sum of their bounds; a pair needs a bound for every committed update in it and at least one commit.
    Runs logged before ``crn_pair`` existed read as one pair per update."""
    shared: dict[tuple, list[dict]] = {}
    for r in records:
        if r["gain"] is not None:  # one measurement, logged under each of its updates' names
            pair = r["pair"] if r["pair"] is not None else (r["agent"],)
            shared.setdefault((r["stage"], pair), []).append(r)
    pairs = []
    for updates in shared.values():
        committed = [r for r in updates if r["committed"]]
        if committed and all(r["bound"] is not None for r in committed):
            first = updates[0]
            pairs.append({"bound": sum(r["bound"] for r in committed), "gain": first["gain"],
                          "se": first["se_paired"], "gain_train": first["gain_train"]})
    return pairs


def certificate_report(runs: list[dict]) -> dict:
    """How informative the certificate was over one or more runs (each ``{stage: metrics}``): calibration and
    Spearman of (bound, paired gain) per pair pooled over runs; the cumulative Spearman is per run, then averaged
    (cumulative series of different runs do not concatenate); medians of the gain estimates' standard errors."""
    from teamtr_verl import algos

    pairs, cumulative, records_all = [], [], []
    for stages in runs:
        records = update_records(stages)
        records_all += records
        run_pairs = measured_pairs(records)
        pairs += run_pairs
        if len(run_pairs) >= 3:
            cumulative.append(algos.cumulative_spearman([p["bound"] for p in run_pairs], [p["gain"] for p in run_pairs]))
    nan = math.nan

    def median_of(key):
        values = [r[key] for r in records_all if r.get(key) is not None and math.isfinite(r[key])]
        return median(values) if values else nan

    report = {"updates": len(pairs), "calibration": nan, "calibration_noisy": nan, "spearman": nan,
              "spearman_cumulative": nan, "bound_sum": nan, "gain_sum": nan, "gain_sum_se": nan, "se_paired": median_of("se_paired"),
              "se_is": median_of("se_is"),
              "backtracks": mean(r["backtracks"] for r in records_all) if records_all else nan,
              "delta_used": median_of("delta_used"),
              "give_ups": sum(1 for r in records_all if not r["committed"])}
    # the same pairs' in-sample gains (crn_gain_train: logged since the gain moved to the held-out groups), if all have one
    in_sample = [p["gain_train"] for p in pairs]
    report["gain_train_sum"] = sum(in_sample) if in_sample and None not in in_sample else nan
    if pairs:
        bounds, gains = [p["bound"] for p in pairs], [p["gain"] for p in pairs]
        report.update(calibration=algos.calibration_fraction(bounds, gains), bound_sum=sum(bounds),
                      gain_sum=sum(gains))
        ses = [p["se"] for p in pairs]
        if all(se is not None and math.isfinite(se) for se in ses):
            report["calibration_noisy"] = algos.calibration_fraction(bounds, gains, ses)
            # a rough scale: consecutive teamtr pairs share a regeneration, so the gains are not independent
            report["gain_sum_se"] = math.sqrt(sum(se * se for se in ses))
        if len(pairs) >= 3:
            report["spearman"] = algos.spearman_rank_correlation(bounds, gains)
    if cumulative:
        report["spearman_cumulative"] = mean(c for c in cumulative if math.isfinite(c)) if any(
            math.isfinite(c) for c in cumulative) else nan
    returns = [d["teamtr/stage/return_mean"] for stages in runs for d in [stages[min(stages)], stages[max(stages)]]]
    report["return_first"], report["return_last"] = mean(returns[0::2]), mean(returns[1::2])
    return report


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

"""The run summary and the plot, from a small hand-written metrics file in verl's file-logger format."""

import json

import pytest

from teamtr_verl import plot, summary

# Per agent and stage: the update's bound and its paired gain. In update order (a1, b1, a2, b2, a3, b3):
# bounds [-0.01, 0.004, 0.0, 0.012, 0.01, 0.02], gains [0.02, 0.0, 0.04, 0.05, 0.06, 0.01].
BOUNDS = {"alice": (-0.01, 0.0, 0.01), "bob": (0.004, 0.012, 0.02)}
GAINS = {"alice": (0.02, 0.04, 0.06), "bob": (0.0, 0.05, 0.01)}


def write_metrics(path, stages=3):
    with open(path, "w") as handle:
        for step in range(1, stages + 1):
            data = {"teamtr/stage/return_mean": 0.1 * step, "teamtr/stage/calibration": 1.0}
            for position, (agent, kl) in enumerate((("alice", 0.004), ("bob", 0.008))):
                data.update({f"teamtr/{agent}/bound": BOUNDS[agent][step - 1],
                             f"teamtr/{agent}/crn_gain": GAINS[agent][step - 1],
                             f"teamtr/{agent}/crn_gain_se": 0.01 * (position + 1), f"teamtr/{agent}/is_gain_se": 0.02,
                             f"teamtr/{agent}/delta_used": 0.4 + 0.1 * step, f"teamtr/{agent}/position": position})
                data.update({f"teamtr/{agent}/kl": kl * step / stages, f"teamtr/{agent}/kl_proposal": 0.5,
                             f"teamtr/{agent}/delta": 0.01, f"teamtr/{agent}/beta": 0.1 * step,
                             f"teamtr/{agent}/committed": 1.0, f"teamtr/{agent}/backtracks": 2,
                             f"teamtr/{agent}/out_of_region": 1.0, f"teamtr/{agent}/gen_s": 2.0,
                             f"teamtr/{agent}/update_s": 0.5, f"teamtr/{agent}/sync_s": 0.03})
            handle.write(json.dumps({"step": step, "data": data}) + "\n")
            handle.write(json.dumps({"step": step, "data": {"val-core/x/acc": 0.5}}) + "\n")  # verl's val line


def test_summary_states_the_numbers(tmp_path):
    write_metrics(tmp_path / "m.jsonl")
    text = summary.summarize(summary.load_stages(tmp_path / "m.jsonl"))
    assert "3 stages" in text
    assert "0.100 -> 0.300 (change +0.200" in text
    # bob: max KL 0.008 vs δ 0.01, 3 of 3 committed, 3 full steps outside, 2 backtracks x 3 stages
    assert "bob: KL per update max 0.008 vs delta 0.01; 3/3 updates committed; 3 full steps left the region; " \
           "6 backtracks" in text
    # gain >= bound for a1, a2, b2, a3; not for b1 (0 < 0.004) nor b3 (0.01 < 0.02): 4/6. Ranks of the bounds
    # [1,3,2,5,4,6], of the gains [3,1,4,5,6,2]: Σd² = 4+4+4+0+4+16 = 32, ρ = 1 − 6·32/(6·35) = 0.086.
    # Counting the gains' own noise (gain + 1.645 SE, SE 0.01 alice / 0.02 bob): b1 0 + 0.0329 >= 0.004 and
    # b3 0.01 + 0.0329 >= 0.02 count too: 6/6.
    assert "6 (bound, paired gain) pairs (a pair: the updates between two regenerations); calibration 0.67 " \
           "(gain >= bound), 1.00 counting the gain's own noise (gain + 1.645 SE >= bound; a 95 % bound scores " \
           ">= 0.90), Spearman 0.09 per pair" in text
    # ± √Σ SE² = √(3 x 0.01² + 3 x 0.02²) = √0.0015 = 0.0387
    assert "sum of bounds +0.0360 vs paired gains +0.1800 ± 0.0387" in text
    # median SEs: paired over [0.01, 0.02] x 3 -> 0.015; held-out 0.02; δ used 0.5, 0.6, 0.7 for both -> median 0.6
    assert "median SE paired (CRN) 0.0150, importance-sampled (held-out) 0.0200; backtracks per update 2.00; " \
           "committed KL used 60% of delta (median)" in text


def test_summary_adds_the_in_sample_gains_when_the_run_logged_them(tmp_path):
    """A run that logged crn_gain_train (the gain on the trained episodes) gets their sum beside the held-out one;
    a run that did not (older runs) prints the line as before."""
    write_metrics(tmp_path / "m.jsonl")
    plain = summary.summarize(summary.load_stages(tmp_path / "m.jsonl"))
    assert "in-sample" not in plain
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    for row in rows:  # in-sample gain = held-out gain + 0.01 for each of the 6 updates: sum 0.18 + 0.06
        if "teamtr/stage/return_mean" in row["data"]:
            row["data"].update({f"teamtr/{a}/crn_gain_train": row["data"][f"teamtr/{a}/crn_gain"] + 0.01
                                for a in ("alice", "bob")})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = summary.summarize(summary.load_stages(tmp_path / "m.jsonl"))
    assert "vs paired gains +0.1800 ± 0.0387 (in-sample, on the trained episodes: +0.2400)" in text
    assert text.replace(" (in-sample, on the trained episodes: +0.2400)", "") == plain



def test_updates_that_share_one_paired_gain_make_one_pair(tmp_path):
    """Stale: both updates of a stage are measured by the stage's one pair of regenerations, so the trainer logs the
    same gain under both names; the pair's bound is the sum of the committed updates' bounds (a give-up has none)."""
    write_metrics(tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    stage_gains = {1: 0.0, 2: 0.05, 3: 0.005}
    for row in rows:
        data, step = row["data"], row["step"]
        if "teamtr/stage/return_mean" not in data:
            continue
        for agent in ("alice", "bob"):
            data.update({f"teamtr/{agent}/crn_gain": stage_gains[step], f"teamtr/{agent}/crn_gain_se": 0.02,
                         f"teamtr/{agent}/crn_pair": 0})
        if step == 3:  # bob gave up: weights restored, no bound
            data.update({"teamtr/bob/committed": 0.0})
            del data["teamtr/bob/bound"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = summary.certificate_report([summary.load_stages(tmp_path / "m.jsonl")])
    # pairs: (−0.01 + 0.004, 0.0), (0.0 + 0.012, 0.05), (0.01, 0.005): bound sums −0.006, 0.012, 0.01 -> 0.016
    assert report["updates"] == 3
    assert report["bound_sum"] == pytest.approx(0.016) and report["gain_sum"] == pytest.approx(0.055)
    # gain >= bound: yes, yes, no (0.005 < 0.01); with 1.645 x 0.02 = 0.0329 added: 0.0379 >= 0.01
    assert report["calibration"] == pytest.approx(2 / 3) and report["calibration_noisy"] == 1.0
    assert report["gain_sum_se"] == pytest.approx(0.02 * 3 ** 0.5)  # one SE per pair, not per update
    # ranks of the bounds [1, 3, 2] and of the gains [1, 3, 2]: ρ = 1
    assert report["spearman"] == pytest.approx(1.0)
    # two updates of a stage with equal gains but two measurements (teamtr, a team with no gradient) stay two pairs
    for row in rows:
        if row["step"] == 1 and "teamtr/stage/return_mean" in row["data"]:
            row["data"]["teamtr/bob/crn_pair"] = 1
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert summary.certificate_report([summary.load_stages(tmp_path / "m.jsonl")])["updates"] == 4

def test_a_swap_s_metrics_are_not_an_agent(tmp_path):
    """teamtr/stage0/... (an aligned swap) and teamtr/<frozen>/replaced (a direct swap of a frozen agent) name no
    trained agent: the summary and the plot list alice and bob only, with the same numbers."""
    write_metrics(tmp_path / "m.jsonl")
    plain = summary.summarize(summary.load_stages(tmp_path / "m.jsonl"))
    with open(tmp_path / "m.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 3, "data": {"teamtr/stage0/kl": 0.004, "teamtr/stage0/crn_gain": -0.1,
                                                     "teamtr/carol/replaced": 1.0}}) + "\n")
    stages = summary.load_stages(tmp_path / "m.jsonl")
    assert summary.agents_of(stages) == ["alice", "bob"]
    assert summary.summarize(stages) == plain
    plot.main([str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 0


def test_plot_draws_every_panel(tmp_path):
    write_metrics(tmp_path / "m.jsonl")
    out = tmp_path / "run.png"
    titles = plot.plot(tmp_path, out)  # a run directory: the metrics file is found inside
    assert titles == list(plot.PANELS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2  # a directory without metrics
    assert "holds no *.jsonl metrics file" in capsys.readouterr().err
    (tmp_path / "grpo.jsonl").write_text(json.dumps({"step": 1, "data": {"actor/pg_loss": 0.1}}) + "\n")
    assert plot.main([str(tmp_path / "grpo.jsonl")]) == 2  # metrics of a non-TeamTR run
    assert "no teamtr/stage/* metrics" in capsys.readouterr().err
    assert summary.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_return_verdict_compares_the_windows_against_their_noise():
    # first 3: mean 0.2, sample var 0.01; last 3: mean 0.8, var 0.01 -> 2·sqrt((0.01+0.01)/3) = 0.1633 < 0.6
    assert "improved (first 3 stages 0.200, last 3 0.800, difference +0.600 vs 2 standard errors 0.163)" in \
        summary.return_verdict([0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9])
    # same means, but a spread so large (var 1.0 per window) that 0.6 < 2·sqrt(2/3) = 1.633
    assert "did NOT improve" in summary.return_verdict([-0.8, 0.2, 1.2, 0.5, -0.2, 0.8, 1.8])
    assert "got worse" in summary.return_verdict([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert "too few stages (5)" in summary.return_verdict([0.1] * 5)


def test_console_output_gives_the_same_stages_as_the_metrics_file(tmp_path):
    """verl's console logger line, as Ray prints it from the TaskRunner, numpy scalars and strings included."""
    write_metrics(tmp_path / "m.jsonl")
    from_file = summary.load_stages(tmp_path / "m.jsonl")
    lines = ["\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m Training Progress: 33%",
             "\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m step:0 - not-a-teamtr-line:1"]
    for step, data in from_file.items():
        items = [f"{k}:{v}" for k, v in data.items()] + ["num_turns/min:np.int32(2)", "note:hello"]
        lines.append(f"\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m step:{step} - " + " - ".join(items))
    (tmp_path / "console.log").write_text("\n".join(lines) + "\n")
    from_console = summary.load_stages(tmp_path / "console.log")
    assert list(from_console) == list(from_file)
    for step in from_file:
        assert from_console[step].pop("num_turns/min") == 2.0 and "note" not in from_console[step]
        assert from_console[step] == pytest.approx(from_file[step])
    out = tmp_path / "console.png"
    assert plot.main([str(tmp_path / "console.log"), "-o", str(out)]) == 0 and out.stat().st_size > 10_000


def stage_line(step, ret, **extra):
    return json.dumps({"step": step, "data": {"teamtr/stage/return_mean": ret, "teamtr/alice/kl": ret / 100,
                                              "teamtr/alice/delta": 0.01, **extra}})


def write_resumed_run(path):
    """Run 1 logs its start-up validation and stages 1-4 (checkpoint at 2; stage 2 with its validation line, stage 3
    with a key stage 3 of run 2 lacks), then is killed half-way through a line. Run 2 resumes from global_step_2:
    its start-up validation at step 2, then stages 3-5."""
    lines = [
        json.dumps({"step": 0, "data": {"val-core/acc": 0.0}}),
        stage_line(1, 0.1), stage_line(2, 0.2), json.dumps({"step": 2, "data": {"val-core/acc": 0.25}}),
        stage_line(3, 0.3, **{"teamtr/stage/certificate": -1.0}), stage_line(4, 0.4), '{"step": 5, "data": {"te',
        json.dumps({"step": 2, "data": {"val-core/acc": 0.26}}),
        stage_line(3, 0.33), stage_line(4, 0.44), stage_line(5, 0.55),
    ]
    path.write_text("\n".join(lines) + "\n")


def test_a_resumed_run_is_read_as_one_run(tmp_path):
    write_resumed_run(tmp_path / "m.jsonl")
    stages = summary.load_stages(tmp_path / "m.jsonl")
    assert {s: d["teamtr/stage/return_mean"] for s, d in stages.items()} == {1: 0.1, 2: 0.2, 3: 0.33, 4: 0.44, 5: 0.55}
    assert stages[2]["val-core/acc"] == 0.25  # run 1's stage 2 with its own validation line, not run 2's re-validation
    assert "teamtr/stage/certificate" not in stages[3]  # run 2's stage 3 replaced run 1's whole, not key by key
    text = summary.summarize(stages)
    assert "TeamTR run: 5 stages" in text and "0.100 -> 0.550 (change +0.450)" in text


def test_a_repeated_last_step_is_a_new_occurrence_and_later_stages_of_the_old_run_are_dropped(tmp_path):
    # a: run 1 logged stages 1-4 (4 with a validation line), its last checkpoint was 2; run 2 resumed without a
    # start-up validation and stopped after stage 3: run 1's stage 4 belongs to a timeline run 2 left.
    (tmp_path / "a.jsonl").write_text("\n".join([
        stage_line(1, 0.1), stage_line(2, 0.2), stage_line(3, 0.3), stage_line(4, 0.4, **{"x/only_run_1": 1.0}),
        json.dumps({"step": 4, "data": {"val-core/acc": 0.5}}), stage_line(3, 0.33)]) + "\n")
    stages = summary.load_stages(tmp_path / "a.jsonl")
    assert {s: d["teamtr/stage/return_mean"] for s, d in stages.items()} == {1: 0.1, 2: 0.2, 3: 0.33}
    # b: run 1 logged stages 1-2, its last checkpoint was 1; run 2 resumed without a start-up validation, so its
    # first line repeats the last step: only the repeated keys tell it from a second line of the same step.
    (tmp_path / "b.jsonl").write_text("\n".join([
        stage_line(1, 0.1), stage_line(2, 0.2, **{"x/only_run_1": 1.0}), stage_line(2, 0.22)]) + "\n")
    stages = summary.load_stages(tmp_path / "b.jsonl")
    assert {s: d["teamtr/stage/return_mean"] for s, d in stages.items()} == {1: 0.1, 2: 0.22}
    assert "x/only_run_1" not in stages[2]


def test_occurrences_merge_one_steps_lines_and_mark_restarts():
    rows = [(1, {"a": 1}), (1, {"b": 2}), (2, {"a": 3}), (2, {"a": 4}), (1, {"a": 5}), (3, {"a": 6})]
    assert summary.occurrences(rows) == [(1, {"a": 1, "b": 2}, False), (2, {"a": 3}, False), (2, {"a": 4}, True),
                                         (1, {"a": 5}, True), (3, {"a": 6}, False)]


def test_plot_draws_a_resumed_run_once_per_stage(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    write_resumed_run(tmp_path / "m.jsonl")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() draws, to read its lines back
    plot.plot(tmp_path / "m.jsonl", tmp_path / "run.png")
    (figure,) = figures
    (return_line,) = figure.axes[plot.PANELS.index("team return")].get_lines()
    assert return_line.get_xdata().tolist() == [1, 2, 3, 4, 5]
    assert return_line.get_ydata().tolist() == [0.1, 0.2, 0.33, 0.44, 0.55]

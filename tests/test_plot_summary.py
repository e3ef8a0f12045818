"""The run summary and the plot, from a small hand-written metrics file in verl's file-logger format."""

import json

import pytest

from teamtr_verl import plot, summary


def write_metrics(path, stages=3):
    with open(path, "w") as handle:
        for step in range(1, stages + 1):
            data = {"teamtr/stage/return_mean": 0.1 * step, "teamtr/stage/certificate_sum": -0.05 * step,
                    "teamtr/stage/measured_gain_sum": 0.02 * step, "teamtr/stage/calibration": 1.0}
            for agent, kl in (("alice", 0.004), ("bob", 0.008)):
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
    assert "certificate (sum of stage bounds) -0.1500 vs measured gain (sum) 0.0600" in text


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

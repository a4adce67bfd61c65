"""records/logs.py and records/stats.py on logs in the leaderboard format (docs/benchmark.md#log-format),
written here or taken from the leaderboard (tests/data/)."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

RECORDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "records")
sys.path.insert(0, RECORDS)

import logs  # noqa: E402
import stats  # noqa: E402

SEPARATOR = "=" * 100
CODE = "import torch\nprint('train')\n"


def val_line(step, total, loss, train_time_s=None):
    line = f"step:{step}/{total} val_loss:{loss:.5f}"
    if train_time_s is not None:
        line += f" train_time:{train_time_s:.3f}s step_avg:{1000 * train_time_s / max(step, 1):.2f}ms"
    return line


def write_log(path, trials, total, code=CODE, extra_before=(), extra_per_step=None, train_time=None):
    """A log as train_gpt.py writes it: code, separator, header, separator, then for every trial its
    val lines (trials: list of {step: loss}); extra_per_step(trial, step) gives lines after a val line;
    train_time(step) gives the cumulative training seconds."""
    lines = [SEPARATOR, "Running PyTorch 2.11.0 compiled for CUDA 13.0 on NVIDIA H100 80GB HBM3 "
             "with world_size 8", SEPARATOR, *extra_before]
    for trial, losses in enumerate(trials):
        for step, loss in losses.items():
            lines.append(val_line(step, total, loss, train_time(step) if train_time else None))
            if extra_per_step:
                lines += extra_per_step(trial, step)
    path.write_text(code + "\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# Set a: 4 runs of T=1000. Step 500: mean 3.29 fails. Step 750: losses 3.276, 3.278, 3.277, 3.277,
# mean 3.277, (3.28 - 3.277) * sqrt(4) = 0.006 >= 0.004 passes -> first passing step 750.
# std at 750 (ddof=1): deviations -0.001, +0.001, 0, 0 -> sqrt(2e-6 / 3) = 0.00081650.
SET_A = [
    {0: 10.8258, 500: 3.288, 750: 3.276, 1000: 3.270},
    {0: 10.8258, 500: 3.292, 750: 3.278, 1000: 3.272},
    {0: 10.8258, 500: 3.290, 750: 3.277, 1000: 3.271},
    {0: 10.8258, 500: 3.290, 750: 3.277, 1000: 3.271},
]
# Set b: 1 run. Step 750: (3.28 - 3.279) * 1 = 0.001 fails; step 1000: 3.275 -> 0.005 passes.
SET_B = [{0: 10.8258, 500: 3.300, 750: 3.279, 1000: 3.275}]


@pytest.fixture
def set_a(tmp_path):
    # Two runs per file (multi-trial logs), two files.
    return [write_log(tmp_path / "a0.txt", SET_A[:2], 1000), write_log(tmp_path / "a1.txt", SET_A[2:], 1000)]


@pytest.fixture
def set_b(tmp_path):
    return [write_log(tmp_path / "b0.txt", SET_B, 1000)]


def run_stats_json(capsys, argv):
    assert stats.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_multi_trial_log_yields_one_run_per_trial(set_a):
    log = logs.parse_log(set_a[0])
    assert [run.losses() for run in log.runs] == SET_A[:2]
    assert [run.trial for run in log.runs] == [0, 1]
    assert log.code == CODE
    assert log.hardware == "8x NVIDIA H100 80GB HBM3"
    assert log.runs[0].total_steps == 1000 and log.runs[0].final_step == 1000


def test_per_step_mean_std_n(set_a):
    result = stats.load_result_set(set_a, "a")
    assert result.n == 4
    assert sorted(result.steps) == [0, 500, 750, 1000]
    assert result.steps[750].mean == pytest.approx(3.277, abs=1e-12)
    assert result.steps[750].std == pytest.approx(math.sqrt(2e-6 / 3), rel=1e-9)  # 0.00081650
    assert result.steps[500].mean == pytest.approx(3.29, abs=1e-12)
    assert result.steps[0].std == pytest.approx(0.0, abs=1e-12)
    assert all(s.n == 4 for s in result.steps.values())


def test_single_run_has_no_std(set_b):
    result = stats.load_result_set(set_b, "b")
    assert result.steps[1000].std is None and result.steps[1000].n == 1


def test_first_passing_step_and_its_mean(set_a, set_b):
    a = stats.load_result_set(set_a, "a")
    assert a.first_passing_step == 750
    assert a.mean_at_first_passing_step == pytest.approx(3.277, abs=1e-12)
    b = stats.load_result_set(set_b, "b")
    assert b.first_passing_step == 1000
    assert b.mean_at_first_passing_step == pytest.approx(3.275, abs=1e-12)


def test_mean_exactly_on_the_bar_clears_it(tmp_path):
    # n=1, L=3.276: (3.28 - 3.276) * 1 = 0.004 exactly, which `>=` accepts (float error aside).
    result = stats.load_result_set([write_log(tmp_path / "x.txt", [{0: 10.8, 100: 3.276}], 100)], "x")
    assert result.first_passing_step == 100


def test_step_missing_from_a_run_cannot_be_reported(tmp_path):
    # Run 2 did not log step 50, where run 1 alone would pass; the mean over all runs first exists
    # and passes at step 100: losses 3.270, 3.272 -> (3.28 - 3.271) * sqrt(2) = 0.0127.
    paths = [write_log(tmp_path / "r1.txt", [{0: 10.8, 50: 3.20, 100: 3.270}], 100),
             write_log(tmp_path / "r2.txt", [{0: 10.8, 100: 3.272}], 100)]
    result = stats.load_result_set(paths, "a")
    assert result.steps[50].n == 1
    assert result.first_passing_step == 100
    assert any("not logged by every run" in w for w in stats.consistency_warnings(result))


def test_set_that_never_passes(tmp_path):
    result = stats.load_result_set([write_log(tmp_path / "x.txt", [{0: 10.8, 100: 3.2790}], 100)], "x")
    assert result.first_passing_step is None and result.mean_at_first_passing_step is None


def test_pairwise_statistic_hand_computed():
    # a: S=750, L=3.277, n=4; b: S=1000, L=3.275, n=1.
    # ((3.275 - 3.277) + (1000 - 750) * 0.0045 / 100) / sqrt(1/4 + 1/1)
    #   = (-0.002 + 0.01125) / sqrt(1.25) = 0.00925 * 0.894427191 = 0.0082734515
    assert stats.pairwise_statistic(750, 3.277, 4, 1000, 3.275, 1) == pytest.approx(0.0082734515, rel=1e-8)
    # Swapping the sets flips the sign: positive means the first set is better.
    assert stats.pairwise_statistic(1000, 3.275, 1, 750, 3.277, 4) == pytest.approx(-0.0082734515, rel=1e-8)


def test_json_schema_single_set(capsys, set_a):
    payload = run_stats_json(capsys, set_a)
    assert set(payload) == {"loss", "n", "first_passing_step", "mean_at_first_passing_step", "steps",
                            "steps_without_raw_loss"}
    assert payload["loss"] == "readout" and payload["steps_without_raw_loss"] == []
    assert payload["n"] == 4 and payload["first_passing_step"] == 750
    assert payload["mean_at_first_passing_step"] == pytest.approx(3.277, abs=1e-12)
    assert set(payload["steps"]) == {"0", "500", "750", "1000"}
    assert set(payload["steps"]["750"]) == {"mean", "std", "n"}
    assert payload["steps"]["750"]["n"] == 4


def test_json_schema_with_vs(capsys, set_a, set_b):
    payload = run_stats_json(capsys, [*set_a, "--vs", *set_b])
    assert set(payload) == {"a", "b", "pairwise"}
    assert payload["a"]["first_passing_step"] == 750 and payload["b"]["first_passing_step"] == 1000
    assert payload["b"]["steps"]["1000"]["std"] is None
    assert payload["pairwise"]["statistic"] == pytest.approx(0.0082734515, rel=1e-8)
    assert payload["pairwise"]["significant"] is True  # 0.00827 >= 0.004


def test_json_pairwise_is_null_when_a_set_never_passes(capsys, tmp_path, set_a):
    never = write_log(tmp_path / "never.txt", [{0: 10.8, 1000: 3.2795}], 1000)
    payload = run_stats_json(capsys, [*set_a, "--vs", never])
    assert payload["b"]["first_passing_step"] is None
    assert payload["b"]["mean_at_first_passing_step"] is None
    assert payload["pairwise"] == {"statistic": None, "significant": None}


def diag_lines(trial, step):
    """Neuron diagnostics written after each val line: dead fraction 0.1 * (trial + 1) * step/1000,
    plus a leverage line with two matrices and an unknown field."""
    dead = 0.1 * (trial + 1) * step / 1000
    neurons = {"step": step, "kind": "neurons", "dead_fraction": dead, "nearly_dead_fraction": 2 * dead,
               "dead_per_layer": [dead, dead], "some_future_field": {"x": 1}}
    leverage = {"step": step, "kind": "leverage", "matrices": {
        "blocks.0.mlp.fc.weight": {"cv": 0.2, "max_over_min": 5.0, "starved_fraction": 0.1},
        "blocks.0.mlp.proj.weight": {"cv": 0.4, "max_over_min": 9.0, "starved_fraction": 0.3}}}
    return [f"diag {json.dumps(neurons)}", f"diag {json.dumps(leverage)}", "some other line"]


def test_diagnostic_and_config_lines_are_parsed_and_attached_to_their_trial(tmp_path):
    config = 'config {"recipe": "muon", "lr": 0.025}'
    path = write_log(tmp_path / "d.txt", SET_A[:2], 1000, extra_before=[config, "config not json"],
                     extra_per_step=diag_lines)
    log = logs.parse_log(path)
    assert log.recipe == "muon" and log.configs == [{"recipe": "muon", "lr": 0.025}]
    assert [run.losses() for run in log.runs] == SET_A[:2]  # diag lines never count as val lines
    assert all(run.recipe == "muon" for run in log.runs)
    second = log.runs[1]
    assert [d["step"] for d in second.diagnostics if d["kind"] == "neurons"] == [0, 500, 750, 1000]
    assert stats.neuron_series(second, "dead_fraction")[1000] == pytest.approx(0.2)


def test_diagnostics_written_before_their_val_line_join_the_right_trial(tmp_path):
    # Here each trial's diag line precedes its val line, so trial 2's step-0 diag comes right after
    # trial 1's step-1000 val line.
    lines = [SEPARATOR, SEPARATOR]
    for trial in range(2):
        for step in (0, 1000):
            lines.append("diag " + json.dumps({"step": step, "kind": "neurons", "dead_fraction": trial}))
            lines.append(val_line(step, 1000, 3.0))
    path = tmp_path / "before.txt"
    path.write_text("\n".join(lines) + "\n")
    runs = logs.parse_log(path).runs
    assert [[d["dead_fraction"] for d in run.diagnostics] for run in runs] == [[0, 0], [1, 1]]


def test_diagnostics_summary_means_over_runs(tmp_path):
    path = write_log(tmp_path / "d.txt", SET_A[:2], 1000, extra_before=['config {"recipe": "aurora"}'],
                     extra_per_step=diag_lines)
    summary = stats.summarize_diagnostics([stats.load_result_set([path], "a")])
    assert list(summary) == ["aurora"]
    dead = summary["aurora"]["dead_fraction"]
    # step 1000: trials give 0.1 and 0.2 -> mean 0.15 over n=2 runs.
    assert dead[1000].mean == pytest.approx(0.15) and dead[1000].n == 2
    assert summary["aurora"]["nearly_dead_fraction"][1000].mean == pytest.approx(0.3)
    # leverage: mean over the two matrices, identical in both runs.
    assert summary["aurora"]["leverage_cv"][500].mean == pytest.approx(0.3)
    assert summary["aurora"]["leverage_starved_fraction"][500].mean == pytest.approx(0.2)


def test_leaderboard_style_log(tmp_path):
    # train_time in ms, training lines without val_loss, no config or diag lines.
    text = (CODE + SEPARATOR + "\nRunning PyTorch 2.10.0 compiled for CUDA 12.8 on NVIDIA H100 with world_size 8\n"
            + SEPARATOR + "\nstep:0/200 val_loss:10.8258 train_time:0ms step_avg:nanms\n"
            "step:1/200 train_time:120ms step_avg:120.00ms\n"
            "step:100/200 val_loss:3.5000 train_time:15000ms step_avg:150.00ms\n"
            "step:200/200 val_loss:3.2700 train_time:30000ms step_avg:150.00ms\n"
            "peak memory allocated: 30000 MiB\n")
    (run,) = logs.parse_log_text(text).runs
    assert run.losses() == {0: 10.8258, 100: 3.5, 200: 3.27}
    assert run.points[1].train_time_s == pytest.approx(15.0)
    assert run.points[0].step_avg_ms is None
    assert stats.steady_step_time_ms(run) == pytest.approx(150.0)  # (30 - 15) s / 100 steps


def test_text_and_markdown_output(capsys, set_a, set_b):
    assert stats.main([*set_a, "--vs", *set_b]) == 0
    out = capsys.readouterr().out
    assert "first passing step 750, mean val loss 3.27700" in out
    assert "statistic 0.00827" in out and ": significant" in out
    assert stats.main([*set_a, "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| a | 1000 | 750 | 4 | 3.27700 | 0.00082 | - | 8x NVIDIA H100 80GB HBM3 |" in out
    assert "| 750 | 3.27700 | 0.00082 | 4 |" in out


def test_plots_write_pngs(tmp_path, set_a, set_b):
    diag = write_log(tmp_path / "d.txt", SET_A[:2], 1000, extra_per_step=diag_lines)
    curves, diagnostics = tmp_path / "curves.png", tmp_path / "diag.png"
    assert stats.main([*set_a, "--vs", diag, "--plot", str(curves), "--plot-diagnostics", str(diagnostics)]) == 0
    for png in (curves, diagnostics):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_command_line_script(tmp_path, set_a):
    done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), *set_a, "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["first_passing_step"] == 750
    missing = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), str(tmp_path / "nope.txt")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


def test_log_cut_off_mid_run_is_reported_with_its_last_step_and_exit_1(tmp_path, set_a, capsys):
    cut = write_log(tmp_path / "cut.txt", [{0: 10.8258, 500: 3.288}], 1000)  # stopped after step 500 of 1000
    assert stats.main([*set_a, cut]) == 1
    out, err = capsys.readouterr()
    assert "== a (n=5)" in out  # the numbers are still printed
    assert err.splitlines()[-1] == (f"warning: set a: 1 of 5 runs stops before its T=1000, at step 500 ({cut} trial "
                                    "0), and the set does not clear the bar before that: the steps not logged could "
                                    "decide the result (crashed, killed, still running or stopped early)")
    assert stats.main(set_a) == 0 and "stops at step" not in capsys.readouterr().err


def test_a_run_that_stops_after_the_reported_step_leaves_the_result_standing(tmp_path, set_a, capsys):
    """Every run logged the steps up to the reported step, and a run's losses there do not depend on when it
    stopped later: a note, exit 0."""
    early = write_log(tmp_path / "early.txt", [{0: 10.8258, 500: 3.290, 750: 3.277}], 1000)  # stops at 750 of 1000
    assert stats.main([*set_a, early]) == 0
    out, err = capsys.readouterr()
    assert "first passing step 750" in out and "n=5" in out
    assert err.splitlines() == [
        "warning: set a: 1 step(s) not logged by every run (e.g. [1000]); they cannot be the reported step",
        f"note: set a: 1 of 5 runs stops before its T=1000, at step 750 ({early} trial 0), at or after the reported "
        "step 750: every run logged the steps up to it, so the result stands"]


def test_a_folder_is_called_a_folder(tmp_path, capsys):
    assert stats.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is a folder, not a log file; pass the log files in it, "
                                       f"e.g. {tmp_path / '*.txt'}\n")


def test_val_line_without_a_number_is_one_error_naming_the_file_and_line(tmp_path, capsys):
    """Text that looks like val lines but holds a placeholder, as a README quotes them."""
    doc = tmp_path / "notes.md"
    doc.write_text("# notes\n\nIt prints step:0/50 val_loss:10.82584 first, then\nstep:50/50 val_loss:... lower.\n")
    assert stats.main([str(doc)]) == 2
    assert capsys.readouterr().err == (f"error: {doc}:4: 'step:50/50 val_loss:...': the val_loss is not a number; "
                                       "pass the logs a training run wrote (logs/*.txt)\n")
    readme = os.path.join(os.path.dirname(RECORDS), "README.md")  # the project's own, which quotes val lines
    done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), readme], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: {readme}")


def test_a_file_without_val_lines_is_one_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("no val lines here\n")
    assert stats.main([str(empty)]) == 2
    assert capsys.readouterr().err == (f"error: no val lines (step:S/T val_loss:X) in {empty}; pass the logs/*.txt "
                                       "files a training run wrote\n")


@pytest.mark.parametrize("name, problem", [
    ("curves.txt", "matplotlib writes no '.txt' files"),
    ("curves", "the name has no extension to say the format"),
])
def test_figure_format_is_checked_before_any_output(tmp_path, set_a, name, problem):
    for flag in ("--plot", "--plot-diagnostics"):
        target = str(tmp_path / name)
        done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), *set_a, flag, target],
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"error: {flag} {target}: {problem}; name it with one of ") and ".png" in line
        assert sorted(os.listdir(tmp_path)) == ["a0.txt", "a1.txt"]  # nothing written


def test_a_log_given_twice_is_refused_as_it_would_inflate_n(tmp_path, set_a, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert stats.main([*set_a, "a0.txt"]) == 2
    assert capsys.readouterr().err == (f"error: a0.txt is {set_a[0]} again: every log is one set of runs, counted "
                                       "once (twice would inflate n); give each log once\n")
    assert stats.main([*set_a, "--vs", set_a[1]]) == 2
    assert capsys.readouterr().err.startswith(f"error: {set_a[1]} is {set_a[1]} again: ")


@pytest.mark.parametrize("argv, message", [
    (["--vs-label", "b2"], "--vs-label names the --vs set; give --vs LOG... too"),
    (["--vs", "{b}", "--label", "x", "--vs-label", "x"],
     "--label and --vs-label are both 'x'; give the sets two names"),
    (["--plot", "{tmp}/f.png", "--plot-diagnostics", "{tmp}/f.png"],
     "--plot and --plot-diagnostics both name {tmp}/f.png; give each figure its own file"),
    (["--json", "--markdown"], "argument --markdown: not allowed with argument --json"),
    (["--by-config", "--vs", "{b}"], "--by-config groups the runs itself; leave out --vs"),
])
def test_flags_that_contradict_each_other_are_refused(tmp_path, set_a, set_b, capsys, argv, message):
    with pytest.raises(SystemExit) as refused:
        stats.main([*set_a, *(arg.format(b=set_b[0], tmp=tmp_path) for arg in argv)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message.format(tmp=tmp_path))


def test_missing_figure_folder_is_refused_before_any_output(tmp_path, set_a):
    for flag in ("--plot", "--plot-diagnostics"):
        target = str(tmp_path / "missing" / "x.png")
        done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), *set_a, flag, target],
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
        assert done.stderr.splitlines() == [f"error: {flag} {target}: the folder {tmp_path / 'missing'} does not "
                                            "exist; create it or write elsewhere"]
    # A path that is a folder, refused before the table too.
    folder = tmp_path / "taken.png"
    folder.mkdir()
    done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), *set_a, "--plot", str(folder)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: --plot {folder}: {folder} is a folder; name a file"]


# ---- the public log of leaderboard result #17 (Aurora, 20 runs), measured lines only ----

RECORD17 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "record17_aurora_298f02bc.txt")


def test_record17_log_gives_the_published_result(capsys):
    result = run_stats_json(capsys, [RECORD17])
    assert result["n"] == 20 and result["first_passing_step"] == 3175
    # Exactly 3.278845: summed as logged decimals it rounds to the published 3.27885.
    assert f"{result['mean_at_first_passing_step']:.5f}" == "3.27885"
    steps = result["steps"]
    assert f"{steps['3150']['mean']:.5f}" == "3.28039" and f"{steps['3200']['mean']:.5f}" == "3.27811"
    assert all(s["n"] == 20 for s in steps.values()) and f"{steps['3175']['std']:.5f}" == "0.00111"
    assert steps["0"]["mean"] == pytest.approx(10.82584, abs=1e-9)  # every trial starts at ln(50304)
    # 3150 misses the bar ((3.28 - 3.28039) * sqrt(20) < 0.004), 3175 clears it.
    assert not stats.clears_bar(stats.bar_statistic(steps["3150"]["mean"], 20))


def test_record17_log_markdown_row(capsys):
    assert stats.main([RECORD17, "--markdown"]) == 0
    assert "| a | 3200 | 3175 | 20 | 3.27885 | 0.00111 | 157.3 ms | 8x NVIDIA H100 80GB HBM3 |" in capsys.readouterr().out


def fate_lines(trial, step):
    """A fate line and, after step 0, an fc_updates line over the interval since the previous probe
    (250 steps here): matrix A has 2 dead rows of 8, matrix B none."""
    fate = {"step": step, "trial": trial, "kind": "fate", "ever_dead_fraction": 0.4 * step / 1000,
            "permanent_fraction": 0.3 * step / 1000, "revived_fraction": 0.1 * step / 1000}
    lines = [f"diag {json.dumps(fate)}"]
    if step > 0:
        updates = {"step": step, "trial": trial, "kind": "fc_updates", "since_step": step - 250, "matrices": {
            "blocks.0.mlp.fc.weight": {"dead_rows": 2, "live_rows": 6, "dead_update_norm": 1.0, "live_update_norm": 2.0,
                                       "dead_preact_change": -0.5, "live_preact_change": 0.1},
            "blocks.1.mlp.fc.weight": {"dead_rows": 0, "live_rows": 8, "dead_update_norm": None,
                                       "live_update_norm": 4.0, "dead_preact_change": None,
                                       "live_preact_change": 0.3}}}
        lines.append(f"diag {json.dumps(updates)}")
    return lines


def test_fate_and_fc_update_summaries_pool_rows_and_divide_by_the_interval(tmp_path):
    config = 'config {"recipe": "aurora", "hyperparameters": {"model": {"mlp_ratio": 8}}}'
    trials = [{0: 6.0, 250: 5.0, 500: 4.0}] * 2
    path = write_log(tmp_path / "f.txt", trials, 500, extra_before=[config], extra_per_step=fate_lines)
    (run,) = logs.parse_log(path).runs[:1]
    assert run.mlp_ratio == 8
    summary = stats.summarize_diagnostics([stats.load_result_set([path], "a")])["aurora"]
    assert summary["permanent_fraction"][500].mean == pytest.approx(0.15) and summary["permanent_fraction"][500].n == 2
    assert summary["permanent_of_ever_dead"][500].mean == pytest.approx(0.75)
    assert 0 not in summary["permanent_of_ever_dead"]  # nothing ever dead: no share
    # Dead rows: only matrix A's 2 -> 1.0; live rows: (6 * 2.0 + 8 * 4.0) / 14; both per step of 250.
    assert summary["fc_dead_update_norm_per_step"][500].mean == pytest.approx(1.0 / 250)
    assert summary["fc_live_update_norm_per_step"][500].mean == pytest.approx(44 / 14 / 250)
    assert summary["fc_dead_over_live_update_norm"][500].mean == pytest.approx(14 / 44)
    assert summary["fc_dead_preact_change_per_step"][500].mean == pytest.approx(-0.5 / 250)
    assert summary["fc_live_preact_change_per_step"][500].mean == pytest.approx((6 * 0.1 + 8 * 0.3) / 14 / 250)
    assert sorted(summary["fc_dead_over_live_update_norm"]) == [250, 500]
    report = stats.diagnostics_report({"aurora": summary})
    assert "neuron fate" in report and "fc_dead_over_live_update_norm" in report


def test_diagnostics_groups_split_by_mlp_ratio_only_when_ratios_differ(tmp_path):
    def log(name, recipe, ratio):
        config = json.dumps({"recipe": recipe, "hyperparameters": {"model": {"mlp_ratio": ratio}}})
        return write_log(tmp_path / name, [{0: 6.0, 250: 5.0}], 250, extra_before=[f"config {config}"],
                         extra_per_step=fate_lines)
    same = stats.load_result_set([log("a4.txt", "aurora", 4), log("m4.txt", "muon", 4)], "a")
    assert list(stats.diagnostics_groups([same])) == ["aurora", "muon"]
    mixed = stats.load_result_set([log("a4.txt", "aurora", 4), log("a8.txt", "aurora", 8)], "a")
    assert list(stats.diagnostics_groups([mixed])) == ["aurora mlp×4", "aurora mlp×8"]
    png = tmp_path / "fate.png"
    stats.plot_diagnostics(stats.summarize_diagnostics([mixed]), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Each constant of the bar decides one of these sets (runs x losses at step 100; a step-0 line first):
# passes with the real constants, and the other way with a plausible wrong value.
@pytest.mark.parametrize("losses, passes, decided_by", [
    # (3.28 - 3.2765) * 1 = 0.0035: fails the bar 0.004, would pass a bar of 0.003.
    ([3.2765], False, "bar 0.004"),
    # (3.28 - 3.2785) * sqrt(4) = 0.003 fails; times n = 4 instead it would be 0.006 and pass.
    ([3.2785] * 4, False, "sqrt(n)"),
    # (3.28 - 3.2762) * 1 = 0.0038 fails; with a target of 3.2805 it would be 0.0043 and pass.
    ([3.2762], False, "target 3.28"),
    # (3.28 - 3.278) * 2 = 0.004 exactly, which float arithmetic gives as 0.0039999999999995595: the
    # slack makes it pass, as `>=` says; without it it would fail.
    ([3.278] * 4, True, "float slack"),
    # The same bar crossed with n = 16 and 25 (0.0039999999999995595, 0.003999999999997339 in floats).
    ([3.279] * 16, True, "float slack"),
    ([3.2792] * 25, True, "float slack"),
])
def test_each_constant_of_the_bar_decides_a_case(tmp_path, losses, passes, decided_by):
    path = write_log(tmp_path / "x.txt", [{0: 10.8, 100: loss} for loss in losses], 100)
    result = stats.load_result_set([path], "x")
    assert result.n == len(losses)
    assert (result.first_passing_step == 100) is passes, decided_by


def test_bar_statistic_and_slack_values():
    assert stats.bar_statistic(3.277, 4) == pytest.approx(0.006, abs=1e-15)  # (3.28 - 3.277) * sqrt(4)
    assert stats.bar_statistic(3.2775, 9) == pytest.approx(0.0075, abs=1e-15)  # sqrt(9) = 3, not 9
    assert stats.clears_bar(0.004) and stats.clears_bar(0.004 - 1e-13)
    assert not stats.clears_bar(0.004 - 1e-9)  # the slack covers float error only, not a real shortfall
    assert not stats.clears_bar(0.0035) and not stats.clears_bar(0.0039)


def test_step_exchange_rate_decides_a_pairwise_verdict():
    # a: S=3000, L=3.2790, n=4; b: S=3100, L=3.2785, n=4. a's 100 fewer steps are worth 100 * 0.0045/100 =
    # 0.0045 of loss: (-0.0005 + 0.0045) / sqrt(1/4 + 1/4) = 0.0056569 >= 0.004, significant. At a tenth of
    # the rate it would be (-0.0005 + 0.00045) / 0.7071 < 0; at 0.003/100, 0.0035355 < 0.004.
    statistic = stats.pairwise_statistic(3000, 3.2790, 4, 3100, 3.2785, 4)
    assert statistic == pytest.approx(0.004 / math.sqrt(0.5), rel=1e-9)
    assert stats.clears_bar(statistic)


# ---- readout and raw losses (records #42 and #46, and our trainer's lines for such recipes) ----

@pytest.mark.parametrize("line, readout, raw", [
    # The leaderboard's and ours: one loss, no readout.
    ("step:3175/3200 val_loss:3.27885 train_time:500.0s step_avg:157.30ms", 3.27885, 3.27885),
    # #42's public logs: val_loss is the reference-interpolated readout, and the raw loss is not logged.
    ("step:2860/2900 val_loss:3.27837 train_time:2145.235s step_avg:750.08ms ema_beta:0 ref_gamma:-0.075 "
     "ref_step:2375", 3.27837, None),
    ("step:2750/2900 val_loss:3.28852 train_time:2062.380s step_avg:749.96ms ema_beta:0", 3.28852, 3.28852),
    # Ours for #42-style recipes: the raw loss appended.
    ("step:2860/2900 val_loss:3.27837 train_time:2145.235s step_avg:750.08ms ref_gamma:-0.075 ref_step:2375 "
     "raw_val_loss:3.27911", 3.27837, 3.27911),
    # #46's logs, and ours for #46-style recipes: val_loss is raw, val_ema_loss the Tail-EMA readout.
    ("step:2690/2900 val_loss:3.28208 val_avg_loss:3.28208 val_ema_loss:3.27795 train_time:9000.0s "
     "step_avg:3700.00ms", 3.27795, 3.28208),
    ("step:2690/2900 val_loss:3.28208 val_ema_loss:3.27795 train_time:9000.0s step_avg:3700.00ms", 3.27795, 3.28208),
])
def test_val_line_readout_and_raw_losses(line, readout, raw):
    point = logs.parse_val_line(line)
    assert (point.val_loss, point.raw_val_loss) == (readout, raw)
    assert point.train_time_s is not None and point.step_avg_ms is not None


def test_a_readout_or_raw_loss_that_is_not_a_number_is_one_error(tmp_path, capsys):
    for field in ("val_ema_loss", "raw_val_loss"):
        log = tmp_path / f"{field}.txt"
        log.write_text(f"step:10/10 val_loss:3.2 {field}:nan? train_time:1.0s\n")
        assert stats.main([str(log)]) == 2
        assert capsys.readouterr().err == (f"error: {log}:1: '{field}:nan?': the {field} is not a number; pass the "
                                           "logs a training run wrote (logs/*.txt)\n")


def test_raw_flag_decides_on_the_raw_loss_and_says_where_none_was_logged(tmp_path, capsys):
    """Two runs with a readout at step 100; the second logged no raw loss there."""
    a = tmp_path / "a.txt"
    a.write_text("step:50/100 val_loss:3.30000\nstep:100/100 val_loss:3.27000 ref_gamma:-0.075 raw_val_loss:3.27200\n")
    b = tmp_path / "b.txt"
    b.write_text("step:50/100 val_loss:3.30000\nstep:100/100 val_loss:3.27200 ref_gamma:-0.075\n")
    readout = run_stats_json(capsys, [str(a), str(b)])
    assert readout["first_passing_step"] == 100 and readout["mean_at_first_passing_step"] == pytest.approx(3.271)
    assert stats.main([str(a), str(b), "--loss", "raw", "--json"]) == 1
    out, err = capsys.readouterr()
    raw = json.loads(out)
    assert raw["loss"] == "raw" and raw["first_passing_step"] is None and raw["steps_without_raw_loss"] == [100]
    assert raw["steps"]["100"]["n"] == 1 and raw["steps"]["100"]["mean"] == pytest.approx(3.272)
    assert (f"warning: set a: at step(s) [100] a readout was applied (ref_gamma) and no raw loss logged "
            f"(raw_val_loss) in {b}: the raw crossing may lie there, so it is undecided") in err.splitlines()
    assert stats.main([str(a), str(b), "--loss", "raw"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("== a (n=2): 2 run(s) from 2 log(s), the raw loss (--loss raw)\n")
    assert ("a (n=2): the raw loss never clears the bar at a step every run logged it; steps [100] lack a raw loss, "
            "so the raw crossing is undecided") in out


RECORD42 = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "record42_val_lines",
                                         "*.txt")))
RECORD46 = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "record46_val_lines",
                                         "*.txt")))


def test_record42_val_lines_give_the_published_result():
    """#42: 16 runs, each stopping at 2860 of a 2900-step schedule by design; its README: mean 3.278939375 at
    K=2860, (3.28 - mean) * sqrt(16) = 0.00424250."""
    assert len(RECORD42) == 16
    done = subprocess.run([sys.executable, os.path.join(RECORDS, "stats.py"), *RECORD42], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert ("a (n=16): first passing step 2860, mean val loss 3.27894, (3.28 - L) * sqrt(n) = 0.00424 with n=16"
            in done.stdout.splitlines())
    assert done.stderr.splitlines() == [
        "note: set a: 16 of 16 runs stop before their T=2900, at step 2860, at or after the reported step 2860: "
        "every run logged the steps up to it, so the result stands"]
    result = stats.load_result_set(RECORD42, "a")
    assert result.mean_at_first_passing_step == pytest.approx(3.278939375, abs=1e-12)
    assert stats.bar_statistic(result.mean_at_first_passing_step, 16) == pytest.approx(0.0042425, abs=1e-9)
    assert not stats.clears_bar(stats.bar_statistic(result.steps[2850].mean, 16))  # 2850 misses


def test_record42_val_lines_have_no_raw_loss_where_the_readout_applies(capsys):
    assert stats.main([*RECORD42, "--loss", "raw", "--json"]) == 1
    raw = json.loads(capsys.readouterr().out)
    assert raw["first_passing_step"] is None and raw["steps_without_raw_loss"] == [2850, 2860]
    assert max(map(int, raw["steps"])) == 2750  # the raw loss at 2750 is the readout: none applied there


def test_record46_val_lines_give_both_published_crossings(capsys):
    """#46's README: the Tail-EMA readout first clears at 2690 (mean 3.278329; 2685 fails at 0.00387), the raw
    loss at 2735 (mean 3.278345; 2730 fails at 0.00357); seed 7 stops at 2765 by design, the others at 2900."""
    assert len(RECORD46) == 8
    readout = stats.load_result_set(RECORD46, "a")
    assert readout.n == 8 and readout.first_passing_step == 2690
    assert f"{readout.mean_at_first_passing_step:.6f}" == "3.278329"
    assert f"{stats.bar_statistic(readout.steps[2685].mean, 8):.5f}" == "0.00387"
    assert readout.steps[2690].n == 8 and readout.steps[2770].n == 7
    raw = stats.load_result_set(RECORD46, "a", loss="raw")
    assert raw.first_passing_step == 2735 and f"{raw.mean_at_first_passing_step:.6f}" == "3.278345"
    assert f"{stats.bar_statistic(raw.steps[2730].mean, 8):.5f}" == "0.00357"
    for argv, step in (([], 2690), (["--loss", "raw"], 2735)):
        assert stats.main([*RECORD46, *argv]) == 0
        out, err = capsys.readouterr()
        assert f"a (n=8): first passing step {step}, mean val loss" in out
        assert err.splitlines()[-1] == (f"note: set a: 1 of 8 runs stops before its T=2900, at step 2765 "
                                        f"({RECORD46[-1]} trial 0), at or after the reported step {step}: every run "
                                        "logged the steps up to it, so the result stands")


def readout_log(path, points, cut=None):
    """A #46-style log (val_loss the raw loss, val_ema_loss the readout's) of T=100, one trial: points is
    {step: (raw, readout)}; `cut` is a last line the file ends inside (no line end)."""
    lines = [f"step:{step}/100 val_loss:{raw:.5f} val_ema_loss:{readout:.5f}" for step, (raw, readout) in points.items()]
    path.write_text("\n".join(lines) + "\n" + (cut or ""), encoding="utf-8")
    return str(path)


# Two runs a set, both alike (exact means); n = 2 clears the bar at L <= 3.277171. The raw and the readout
# losses cross at different steps: a readout 50 (3.277) / raw 100 (3.276); b readout 100 (3.2765) / raw 100 (3.274).
VS_A = {0: (10.8, 10.8), 50: (3.279, 3.277), 100: (3.276, 3.275)}
VS_B = {0: (10.8, 10.8), 50: (3.278, 3.280), 100: (3.274, 3.2765)}


@pytest.mark.parametrize("loss, a, b, statistic", [
    ("readout", (50, 3.277), (100, 3.2765), (3.2765 - 3.277) + 50 * 0.0045 / 100),
    ("raw", (100, 3.276), (100, 3.274), 3.274 - 3.276),
], ids=["readout", "raw"])
def test_vs_judges_both_sets_on_the_loss_asked_for(tmp_path, capsys, loss, a, b, statistic):
    """`A --vs B --loss raw` must judge B on the raw loss too (judging it on the readout's went unseen)."""
    set_a = [readout_log(tmp_path / f"a{i}.txt", VS_A) for i in range(2)]
    set_b = [readout_log(tmp_path / f"b{i}.txt", VS_B) for i in range(2)]
    payload = run_stats_json(capsys, [*set_a, "--vs", *set_b, "--loss", loss])
    for name, (step, mean) in (("a", a), ("b", b)):
        assert payload[name]["loss"] == loss and payload[name]["first_passing_step"] == step
        assert payload[name]["mean_at_first_passing_step"] == pytest.approx(mean, abs=1e-12)
    assert payload["pairwise"]["statistic"] == pytest.approx(statistic, abs=1e-12)  # sqrt(1/2 + 1/2) = 1


def test_a_val_line_the_log_ends_inside_is_left_out_with_a_warning(tmp_path, capsys):
    """A #46-style log cut inside its last val line (stopped while writing it, or truncated) reported that line's raw
    loss as the readout loss: with its val_ema_loss cut off the line looked like one without a readout."""
    path = readout_log(tmp_path / "cut.txt", {0: (10.8, 10.8), 50: (3.281, 3.279)}, cut="step:100/100 val_loss:3.27400")
    assert logs.parse_log(path).runs[0].losses() == {0: 10.8, 50: 3.279}
    assert stats.main([path, "--json"]) == 1  # the set does not clear the bar, and its run stops before T
    out, err = capsys.readouterr()
    assert json.loads(out)["first_passing_step"] is None
    assert (f"warning: set a: {path} ends inside a val line ('step:100/100 val_loss:3.27400'): cut while it was "
            f"written, or truncated; that line is left out") in err.splitlines()
    # A log whose last line is whole is read to its end.
    whole = readout_log(tmp_path / "whole.txt", {0: (10.8, 10.8), 50: (3.281, 3.279), 100: (3.274, 3.273)})
    assert logs.parse_log(whole).runs[0].losses() == {0: 10.8, 50: 3.279, 100: 3.273}


def config_line(recipe, differences, record_step=None):
    return "config " + json.dumps({"recipe": recipe, "differs_from_record": differences,
                                   "is_record_recipe": not differences, "record_step": record_step})


AURORA_ON_PROJ = "aurora='mlp.proj' in record #17's form on 12 matrices (record: 'none', 0 matrices)"


def test_runs_of_different_configurations_pooled_by_a_glob_are_named_in_a_warning(tmp_path, capsys):
    """logs/soap-muon-*.txt (the README's own glob) took the record's runs and --aurora mlp.proj's as one set."""
    plain = [write_log(tmp_path / f"soap-muon-{i}.txt", [SET_A[i]], 1000, extra_before=[config_line("soap-muon", [])])
             for i in range(2)]
    switched = [write_log(tmp_path / f"soap-muon-a{i}.txt", [SET_A[2 + i]], 1000,
                          extra_before=[config_line("soap-muon", [AURORA_ON_PROJ])]) for i in range(2)]
    assert stats.main([*plain, *switched]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "configurations" in line]
    switch = AURORA_ON_PROJ.split(" (record")[0]
    assert warnings == [f"warning: set a: runs of 2 configurations are pooled: soap-muon as its record (2 runs) | "
                        f"soap-muon: {switch} (2 runs); --by-config tabulates them apart"]
    assert stats.main(plain) == 0 and "configurations" not in capsys.readouterr().err


def test_by_config_compares_each_configuration_with_the_one_the_others_add_to(tmp_path, capsys):
    """An ablation: the recipe (reference), without row_floor (clears the bar 250 steps later: compared at the two
    passing steps) and without tail_ema (never clears it: compared at the record's step, 750 here)."""
    tiny = "steps=1000 (record: 2900)"
    arms = {(): ([3.276, 3.278], [3.270, 3.272]),
            ("without row_floor (record: on mlp)",): ([3.284, 3.286], [3.273, 3.275]),
            ("without tail_ema (record: on mlp)",): ([3.279, 3.281], [3.279, 3.281])}
    paths = []
    for arm, (at_750, at_1000) in arms.items():
        for seed in range(2):
            trial = {0: 10.8258, 500: 3.3, 750: at_750[seed], 1000: at_1000[seed]}
            paths.append(write_log(tmp_path / f"{len(paths)}.txt", [trial], 1000,
                                   extra_before=[config_line("soap-muon", [tiny, *arm], 750)]))
    rows = run_stats_json(capsys, [*paths, "--by-config"])
    assert [(row["configuration"], row["n"], row["readout"]["mean"], row["step"]) for row in rows] == [
        ("soap-muon", 2, 3.277, 750), ("soap-muon: without row_floor", 2, 3.285, 750),
        ("soap-muon: without tail_ema", 2, 3.28, 750)]
    reference, no_floor, no_ema = rows
    assert reference["reference"] and reference["statistic"] is None and reference["common"] == [tiny]
    # (3.274 - 3.277) + 250 * 0.0045 / 100 over sqrt(1/2 + 1/2)
    assert no_floor["statistic"] == pytest.approx(0.00825) and no_floor["step_difference"] == 250
    assert (no_floor["compared_at"], no_floor["reading"]) == ("first passing steps", "row_floor helps")
    assert no_ema["statistic"] == pytest.approx(0.003) and no_ema["step_difference"] is None
    assert (no_ema["compared_at"], no_ema["reading"]) == ("step 750", "undecided")
    assert no_ema["raw"]["mean"] == pytest.approx(3.28) and no_ema["readout"]["std"] == pytest.approx(math.sqrt(2e-6))
    assert stats.main([*paths, "--by-config", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| soap-muon: without row_floor | 2 | 3.28500 ± 0.00141 | 3.28500 ± 0.00141 | +250 | +0.00825 |" in table

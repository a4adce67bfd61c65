"""records/ablate.py (bash run.sh --ablate): its arms and run names, the full-size cost from the records' own logs,
its refusals, a rerun that keeps the complete logs, and the table; one CPU study end to end (slow)."""
import glob
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "records"))
import ablate  # noqa: E402

DATA = ROOT / "tests" / "data"


@pytest.mark.parametrize("recipe, logs, step", [
    ("aurora", "record17_aurora_298f02bc.txt", 3200), ("normuon", "record10_val_lines/*.txt", 3300),
    ("muon", "record36_val_lines/*.txt", 3250), ("aurora-ema-ref", "record42_val_lines/*.txt", 2860),
    ("soap-muon", "record46_val_lines/*.txt", 2900)])
def test_a_records_run_time_is_the_median_its_logs_reach_at_its_last_step(recipe, logs, step):
    times = [float(seconds) for path in glob.glob(str(DATA / logs))
             for seconds in re.findall(rf"step:{step}/\d+ val_loss:\S+.*?train_time:([0-9.]+)s", open(path).read())]
    assert len(times) in (20, 10, 16, 7) and ablate.RECORD_RUNS[recipe][0] == round(statistics.median(times), 1)


def test_plan_prints_the_full_size_cost_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("--plan ran something"))
    assert ablate.main(["--ablate", "soap-muon", "--seeds", "3", "--plan"]) == 0
    assert capsys.readouterr().out == (
        "--ablate soap-muon: 18 arms (the recipe and 17 technique(s) left out) x 3 seed(s) = 54 runs at full size. "
        "One run of record #46 trained for 178.0 minutes on 2x NVIDIA A40 (the median of #46's 7 complete runs), "
        "so the study takes 160.2 hours on such a machine, 320.4 GPU-hours\n")
    assert ablate.main(["--ablate", "aurora", "--seeds", "2", "--techniques", "contra", "--plan"]) == 0
    assert "2 arms (the recipe and 1 technique(s) left out) x 2 seed(s) = 4 runs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--ablate", "adam"], "argument --ablate: invalid choice: 'adam'"),
    (["--ablate", "soap-muon", "--techniques", "row_floor,contra"],
     "error: --techniques row_floor,contra: recipe soap-muon has no technique 'contra'; it has schatten_polar,"),
    (["--ablate", "soap-muon", "--techniques", ","], "names no technique"),
    (["--ablate", "soap-muon", "--seed", "3"], "error: --seed: --ablate sets it for each run itself; leave it out"),
    (["--ablate", "soap-muon", "--without=soap"], "error: --without=soap: --ablate sets it for each run itself"),
    (["--ablate", "soap-muon", "--seeds", "0"], "error: --seeds takes a whole number of runs per arm (1 or more)"),
    (["--ablate", "soap-muon", "--steps", "0"], "error: --steps must be at least 1, got 0"),
    (["--ablate", "soap-muon", "--set", "tail_ema.lambda=2"], "error: --set tail_ema.lambda=2: out of range"),
])
def test_bad_arguments_are_one_error_line_before_any_run(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a bad argument ran something"))
    with pytest.raises(SystemExit) as exit_:
        ablate.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: "), err


def fake_log(path, without, seed, losses):
    """What a finished trainer run leaves: its config line (differences, the record's step) and val lines."""
    differences = ["steps=4 (record: 2900)"] + ([f"without {without} (record: on mlp)"] if without else [])
    config = {"recipe": "soap-muon", "differs_from_record": differences, "record_step": 4,
              "seed": seed}
    lines = ["code", "=" * 100, f"config {json.dumps(config)}"]
    lines += [f"step:{step}/4 val_loss:{loss + 0.001 * seed:.5f} val_ema_loss:{loss - 0.01 + 0.001 * seed:.5f}"
              for step, loss in ((0, 6.0), (2, 5.0), (4, losses))]
    path.write_text("\n".join(lines + ['done {"trials": 1}']) + "\n")


def test_each_arm_and_seed_runs_through_run_sh_and_a_rerun_keeps_the_complete_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablate, "ROOT", tmp_path)
    (tmp_path / "logs").mkdir()
    commands = []

    def run(command, cwd):
        commands.append(command)
        run_id = command[command.index("--run-id") + 1]
        arm = re.search(r"without-(\w+)", run_id)
        fake_log(tmp_path / "logs" / f"{run_id}.txt", arm and arm.group(1), int(run_id[-1]),
                 {None: 4.5, "row_floor": 4.6, "cautious_wd": 4.5}[arm and arm.group(1)])
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(subprocess, "run", run)
    argv = ["--ablate", "soap-muon", "--seeds", "2", "--steps", "4", "--techniques", "row_floor,cautious_wd"]
    assert ablate.main(argv) == 0
    tag = ablate.study_tag(["--steps", "4"])
    assert [c[c.index("--run-id") + 1] for c in commands] == [
        f"ablate-soap-muon-{tag}-{arm}-seed{seed}" for seed in (0, 1)
        for arm in ("recipe", "without-row_floor", "without-cautious_wd")]
    assert commands[1] == ["bash", str(tmp_path / "run.sh"), "--recipe", "soap-muon", "--seed", "0", "--run-id",
                           f"ablate-soap-muon-{tag}-without-row_floor-seed0", "--without", "row_floor", "--steps", "4"]
    table = capsys.readouterr().out
    assert "losses at step 4" in table and "row_floor helps" in table and "cautious_wd" in table
    # An interrupted study: one log without its end line is run again (over itself), the others are kept.
    interrupted = tmp_path / "logs" / f"ablate-soap-muon-{tag}-without-cautious_wd-seed1.txt"
    interrupted.write_text("\n".join(interrupted.read_text().splitlines()[:-1]) + "\n")
    commands.clear()
    assert ablate.main(argv) == 0
    assert len(commands) == 1 and commands[0][-2:] == ["4", "--overwrite"] and str(interrupted.stem) in commands[0]
    assert capsys.readouterr().out.count("is complete: kept") == 5


def test_a_failed_run_stops_the_study_with_its_status_and_keeps_what_is_done(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablate, "ROOT", tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda command, cwd: subprocess.CompletedProcess(command, 3))
    assert ablate.main(["--ablate", "aurora", "--techniques", "contra"]) == 3
    assert "ended with status 3" in capsys.readouterr().err


def test_run_sh_hands_ablate_to_the_driver(capsys):
    done = subprocess.run(["bash", str(ROOT / "run.sh"), "--ablate", "muon", "--seeds", "2", "--plan"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("--ablate muon: 3 arms (the recipe and 2 technique(s)")


@pytest.mark.slow
def test_a_cpu_study_end_to_end_gives_the_table_and_a_rerun_trains_nothing(tmp_path):
    """bash run.sh --ablate in a copy of the project: two arms, one seed, 3 steps, uncompiled."""
    from test_run_sh import project_copy
    project_copy(tmp_path)
    command = ["bash", str(tmp_path / "run.sh"), "--ablate", "soap-muon", "--seeds", "1", "--steps", "3",
               "--techniques", "cautious_wd", "--no-diagnostics"]
    environment = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== soap-muon: runs grouped by their differences from the record, losses at step 3" in done.stdout
    assert "soap-muon: without cautious_wd" in done.stdout and len(list((tmp_path / "logs").glob("ablate-*.txt"))) == 2
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert again.returncode == 0 and again.stdout.count("is complete: kept") == 2 and "val_loss" not in again.stdout


def test_the_tiny_studys_table_script_gives_each_arm_its_verdict_and_welchs_p(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "records" / "2026-12-07_tiny-ablation-soap-muon"))
    import table
    paths = []
    for arm, loss in ((None, 4.5), ("row_floor", 4.6), ("cautious_wd", 4.5)):
        for seed in (0, 1, 2) if arm != "cautious_wd" else (0, 1):
            paths.append(tmp_path / f"{arm}-{seed}.txt")
            fake_log(paths[-1], arm, seed, loss)
    table.main([str(path) for path in paths])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Losses at step 4 (the record's 2690 of 2900 at this horizon)")
    assert out[4] == "| soap-muon | 0, 1, 2 | 4.49100 ± 0.00100 | 4.50100 ± 0.00100 | - | reference | - | - |"
    assert out[5].startswith("| without row_floor | 0, 1, 2 | 4.59100 ± 0.00100 | 4.60100 ± 0.00100 | +0.12247 | "
                             "row_floor helps | +122.47 | ")
    assert out[-1] == "Arms without all of seeds [0, 1, 2] (their verdicts do not count): soap-muon: without cautious_wd: " \
                      "seeds [0, 1]."

"""benchmarks/gpu_check.sh: what it refuses before any stage runs, and how it reports stages that fail, time
out or are skipped. The script runs in a copy of the project whose .venv/bin/python (and so run.sh) is a
stand-in that records its arguments and fails, or hangs, for the stage a test names; the real stages run in
CI (`bash benchmarks/gpu_check.sh --smoke`)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN_PYTHON = """#!/usr/bin/env bash
# Records its arguments; fails when they start with $FAIL, hangs when they start with $HANG.
echo "$*" >> "$CALLS"
if [ -n "${FAIL:-}" ] && [[ "$*" == "$FAIL"* ]]; then echo "failing as the test asks"; exit 3; fi
if [ -n "${HANG:-}" ] && [[ "$*" == "$HANG"* ]]; then exec sleep 60; fi
exit 0
"""
RECIPES = ("aurora", "normuon", "muon", "aurora-ema-ref", "soap-muon")
# The first arguments the stand-in python gets in each stage (run.sh passes its own to it); the five
# recipes' runs start alike, so a test that fails one fails them all.
STAGES = {"setup": "run.sh --setup", "environment": "- cpu", "pytest -m cuda": "-m pytest",
          "shards": "data/synthetic.py",
          **{f"train_gpt.py {recipe} 3 steps --ddp": "-m torch.distributed.run" for recipe in RECIPES},
          "benchmarks/step.py aurora,muon,aurora-ema-ref,soap-muon": "benchmarks/step.py"}
TRAIN = "-m torch.distributed.run"


@pytest.fixture
def project(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), tmp_path / "benchmarks")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    (tmp_path / "run.sh").write_text('exec .venv/bin/python run.sh "$@"\n')
    return tmp_path


def gpu_check(project, *args, **env):
    """(exit status, stdout, stderr, the stand-in's calls)."""
    calls = project / "calls.txt"
    environment = {k: v for k, v in os.environ.items() if k not in ("OUT", "DEADLINE_S")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=project, capture_output=True, text=True,
                          timeout=120, env={**environment, "CALLS": str(calls), **env})
    return done.returncode, done.stdout, done.stderr, calls.read_text().splitlines() if calls.exists() else []


def summary(project):
    return (project / "logs" / "gpu_check" / "summary.txt").read_text().splitlines()


def test_every_stage_passing_is_a_pass_and_the_trainer_may_replace_its_fixed_run_ids(project):
    status, stdout, stderr, calls = gpu_check(project, "--smoke")
    assert status == 0, stdout + stderr
    lines = summary(project)
    assert [line.split("]")[0][1:] for line in lines if line.startswith("[")] == [
        name for name in STAGES if name != "shards"]
    assert all(" ok (" in line for line in lines if line.startswith("["))
    assert lines[-1].startswith("gpu_check: all stages passed in ")
    trains = [call for call in calls if call.startswith(TRAIN)]
    assert [call.split("--recipe ")[1].split()[0] for call in trains] == list(RECIPES)
    for recipe, train in zip(RECIPES, trains):  # a second check replaces the first one's logs
        assert f"--run-id gpu_check-{recipe} --overwrite" in train


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_failing_stage_makes_the_check_fail(project, stage):
    status, stdout, stderr, _ = gpu_check(project, "--smoke", FAIL=STAGES[stage])
    assert status == 1, stdout + stderr
    lines = summary(project)
    failed = [line for line in lines if line.startswith(f"[{stage}] FAILED")]
    assert len(failed) == 1, lines
    assert lines[-1].startswith("gpu_check: some stages FAILED in ")
    assert stdout.splitlines()[-1] == lines[-1]


def test_a_stage_out_of_time_and_the_stages_after_the_deadline_make_the_check_fail(project):
    # 10 s: the stand-in stages before it take well under the 5 s a stage needs left to start.
    status, stdout, stderr, calls = gpu_check(project, "--smoke", HANG=STAGES["pytest -m cuda"], DEADLINE_S="10")
    assert status == 1, stdout + stderr
    lines = [line for line in summary(project) if line.startswith("[")]
    assert lines[2].startswith("[pytest -m cuda] TIMED OUT after ")
    assert lines[3:] == [f"[{name}] SKIPPED: the 10s deadline has passed" for name in list(STAGES)[4:]]
    assert not [call for call in calls if call.startswith(("-m torch.distributed.run", "benchmarks/step.py"))]


@pytest.mark.parametrize("deadline", ["abc", "-5", "0", "5", "1e3", "60s"])
def test_a_deadline_that_is_not_a_number_of_seconds_is_refused_before_any_stage(project, deadline):
    status, stdout, stderr, calls = gpu_check(project, "--smoke", DEADLINE_S=deadline)
    assert (status, stdout, calls) == (2, "", [])
    assert stderr == (f"gpu_check.sh: DEADLINE_S must be a whole number of seconds above 5 (each stage needs more), "
                      f"got '{deadline}'\n")
    assert not (project / "logs").exists()


@pytest.mark.parametrize("args, message", [
    (["--full"], "gpu_check.sh: unknown argument '--full' (use --smoke for the CPU run, or nothing)"),
    (["--smoke", "--smoke"], "gpu_check.sh: one argument at most (--smoke, or nothing), got 2"),
])
def test_unknown_arguments_are_refused_before_any_stage(project, args, message):
    status, stdout, stderr, calls = gpu_check(project, *args)
    assert (status, stdout, stderr, calls) == (2, "", message + "\n", [])
    assert not (project / "logs").exists()


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_stage(project):
    (project / "afile").write_text("x")
    status, stdout, stderr, calls = gpu_check(project, "--smoke", OUT="afile/results")
    assert (status, stdout, calls) == (2, "", [])
    assert stderr == "gpu_check.sh: OUT=afile/results: cannot make or write that folder; set OUT to a writable folder\n"

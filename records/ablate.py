"""The ablation table of a record recipe in one command (docs/recipes.md#techniques):

    bash run.sh --ablate RECIPE --seeds N [--techniques A,B] [--plan] [train_gpt.py arguments ...]

runs the recipe and, as one arm each, the recipe with one technique left out (train_gpt.py --without NAME;
default: every technique it has), every arm over seeds 0..N-1 with the same data order, each run through run.sh
(its setup, data and launch, with the arguments given here). The logs go to logs/ as
ablate-RECIPE-TAG-ARM-seedS.txt, TAG naming the other arguments, so that a rerun after an interruption skips the
complete logs and continues. Then the table of records/stats.py --by-config over them: per arm n, mean and sd of
the readout and raw val loss at the record's step, the leaderboard's pairwise statistic against the recipe and
its reading, and the difference of the steps at which they clear the bar. --plan prints what the study costs at
full size, from the record's own logs, and runs nothing.
"""

import argparse
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "records"), str(ROOT)]  # siblings and the trainer: records/ is not a package

import stats  # noqa: E402
import train_gpt  # noqa: E402
from logs import LogError, parse_log, runs_of  # noqa: E402

# One run of each record on its own hardware: the median train_time its public logs reach at the record's last
# step (tests/data/record*_val_lines and the #17 log; tests/test_ablate.py recomputes them).
RECORD_RUNS = {
    "aurora": (503.4, 8, "NVIDIA H100 80GB HBM3", "#17's 20 runs"),
    "normuon": (485.2, 8, "NVIDIA H100 80GB HBM3", "#10's 10 runs on H100 (log 08ffadff)"),
    "muon": (503.4, 8, "NVIDIA H100 80GB HBM3", "#36's 10 runs"),
    "aurora-ema-ref": (2142.8, 8, "NVIDIA L40S", "#42's 16 runs, at their stop 2860"),
    "soap-muon": (10678.7, 2, "NVIDIA A40", "#46's 7 complete runs"),
}
# What ablate.py sets itself for each run.
OWN_FLAGS = ("--recipe", "--recipes", "--seed", "--seeds", "--run-id", "--save", "--without", "--overwrite")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    parser = train_gpt.ArgumentParser(description=__doc__.split("\n\n")[0])  # flags only in full: --seed is the trainer's
    parser.add_argument("--ablate", required=True, choices=sorted(train_gpt.RECIPES), metavar="RECIPE",
                        help="the recipe whose techniques are left out one at a time")
    parser.add_argument("--seeds", type=int, default=1, help="runs per arm, seeds 0..N-1 (default 1)")
    parser.add_argument("--techniques", help="leave out only these (default: every technique of the recipe)")
    parser.add_argument("--plan", action="store_true", help="print the full-size cost and run nothing")
    args, trainer = parser.parse_known_args(argv)
    if args.seeds < 1:
        fail(f"--seeds takes a whole number of runs per arm (1 or more), got {args.seeds}")
    own = [flag for flag in trainer if flag.split("=")[0] in OWN_FLAGS]
    if own:
        fail(f"{own[0]}: --ablate sets it for each run itself; leave it out")
    techniques = train_gpt.technique_names(train_gpt.RECIPES[args.ablate])
    chosen = techniques if args.techniques is None else [name for name in args.techniques.split(",") if name]
    for name in chosen:
        if name not in techniques:
            fail(f"--techniques {args.techniques}: recipe {args.ablate} has no technique {name!r}; it has "
                 f"{', '.join(techniques)}")
    if not chosen:
        fail(f"--techniques {args.techniques!r} names no technique; give some of {', '.join(techniques)}")
    return args, chosen, trainer


def arms(techniques):
    """(name, train_gpt.py flags) of the recipe itself and of each technique left out."""
    return [("recipe", [])] + [(f"without-{name}", ["--without", name]) for name in techniques]


def study_tag(trainer):
    """8 hex digits naming the trainer arguments of a study (so that its reruns find its logs)."""
    return hashlib.sha1(shlex.join(trainer).encode()).hexdigest()[:8]


def run_id(recipe, trainer, arm, seed):
    return f"ablate-{recipe}-{study_tag(trainer)}-{arm}-seed{seed}"


def is_complete(path):
    """A log whose run ended (our trainer's last line is a `done` event)."""
    if not path.is_file():
        return False
    lines = path.read_text(errors="replace").rstrip("\n").splitlines()
    return bool(lines) and lines[-1].startswith("done ")


def plan(recipe, arm_count, seeds):
    seconds, gpus, device, source = RECORD_RUNS[recipe]
    runs = arm_count * seeds
    record = train_gpt.RECIPES[recipe].record
    hours = runs * seconds / 3600
    return (f"--ablate {recipe}: {arm_count} arms (the recipe and {arm_count - 1} technique(s) left out) x {seeds} "
            f"seed(s) = {runs} runs at full size. One run of record {record} trained for {seconds / 60:.1f} minutes on "
            f"{gpus}x {device} (the median of {source}), so the study takes {hours:.1f} hours on such a machine, "
            f"{hours * gpus:.1f} GPU-hours")


def check_arms(recipe, techniques, trainer):
    """Every arm's arguments as train_gpt.py checks them, before any run (its one error line, exit status 2)."""
    for _, flags in arms(techniques):
        args = train_gpt.parse_args(["--recipe", recipe, *flags, *trainer])
        try:
            train_gpt.resolve_recipe(args, train_gpt.resolve_hyperparameters(args))
        except train_gpt.SetupError as error:
            fail(str(error))


def main(argv=None):
    args, techniques, trainer = parse_args(sys.argv[1:] if argv is None else argv)
    study = arms(techniques)
    if args.plan:
        print(plan(args.ablate, len(study), args.seeds))
        return 0
    check_arms(args.ablate, techniques, trainer)
    paths = []
    for seed in range(args.seeds):  # seed by seed, so that a study cut short has every arm at the same seeds
        for arm, flags in study:
            name = run_id(args.ablate, trainer, arm, seed)
            path = ROOT / "logs" / f"{name}.txt"
            paths.append(path)
            if is_complete(path):
                print(f"ablate: {path.relative_to(ROOT)} is complete: kept", flush=True)
                continue
            command = ["bash", str(ROOT / "run.sh"), "--recipe", args.ablate, "--seed", str(seed), "--run-id", name,
                       *flags, *trainer, *(["--overwrite"] if path.exists() else [])]
            print(f"ablate: {shlex.join(command)}", flush=True)
            status = subprocess.run(command, cwd=ROOT).returncode
            if status != 0:
                print(f"ablate: that run ended with status {status}; the complete logs are kept, and running the same "
                      f"command again continues from there", file=sys.stderr)
                return status
    try:
        runs = runs_of([parse_log(path) for path in paths])
    except LogError as error:
        fail(str(error))
    print(stats.by_configuration_report(stats.by_configuration(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

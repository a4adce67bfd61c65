"""Our train_gpt.py side by side with a leaderboard record script, on the same GPU, data and step count.

    python benchmarks/versus_record.py --record-log records/.../LOG.txt            # aurora, 50 steps, CUDA
    python benchmarks/versus_record.py --record-log LOG.txt --recipe muon --steps 100

The record's code is everything in its log before the first line of 100 '='. Record scripts read
`data/fineweb10B/fineweb_{train,val}_*.bin` relative to where they run, fix their step count as a
constant (`train_steps = 3200`), take the number of trials from their last argument, and hard-code
CUDA under torchrun. So this script, in a work folder (--work, default a fresh temporary one):
  1. writes synthetic full-vocabulary shards (data/synthetic.py, GPT-2's 50257 ids) under
     data/fineweb10B/ with the record's file names, enough for --steps steps and the validation;
  2. saves the record's code with ONE edit, its step-count constant set to --steps (printed as
     `edited: line N ...`; nothing else is changed), and runs it under torchrun on one process with 2 trials;
  3. runs our train_gpt.py with --recipe on the same shards, --steps and 2 trials under torchrun;
then prints both sides' ms/step per trial (train_time / steps at the last validation; the first trial
includes compilation, the second is compile-free) with their first and last val losses (records/logs.py
reads the val lines: the readout's loss where a line has one), and the ratio ours/record of the
compile-free trials.
"""

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT / "records"))
import train_gpt  # noqa: E402
from logs import LogError, parse_log_text  # noqa: E402
from shards import MAX_SHARD_TOKENS, check_output_folder  # noqa: E402
from synthetic import write_synthetic_shards  # noqa: E402

GPT2_VOCAB = 50257
TRIALS = 2
# The step-count constant of record scripts: a name assigned a whole number on a line of its own.
STEP_CONSTANT = re.compile(r"^(?P<indent>\s*)(?P<name>train_steps|num_iterations)\s*=\s*(?P<value>\d+)\s*(#.*)?$")


class RecordError(RuntimeError):
    pass


def record_code(log_text, log_path):
    """The code of a leaderboard log: everything before its first line of 100 '='."""
    lines = log_text.split("\n")
    if train_gpt.SEPARATOR not in lines:
        raise RecordError(f"{log_path}: no line of 100 '=' (not a leaderboard log: the code ends at that line)")
    return "\n".join(lines[:lines.index(train_gpt.SEPARATOR)]) + "\n"


def read_record_code(log_path, steps):
    """(code, edit): the code of the leaderboard log at log_path with its step count set to `steps`, and that
    edit described. RecordError when the log is unreadable or holds no code that compiles."""
    try:
        text = Path(log_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{log_path}: cannot read it as UTF-8 text ({e})") from None
    code = record_code(text, log_path)
    try:
        compile(code, log_path, "exec")
    except SyntaxError as e:
        raise RecordError(f"{log_path}: its code does not parse (line {e.lineno}: {e.msg}); pass a leaderboard log, "
                          f"whose code is the script that ran") from None
    return set_step_count(code, steps, log_path)


def set_step_count(code, steps, log_path):
    """(edited code, description): the one step-count constant set to `steps`."""
    lines = code.split("\n")
    hits = [i for i, line in enumerate(lines) if STEP_CONSTANT.match(line)]
    if len(hits) != 1:
        raise RecordError(f"{log_path}: found {len(hits)} step-count constants (a line `train_steps = N` or "
                          f"`num_iterations = N`), need exactly one to set the step count")
    index = hits[0]
    match = STEP_CONSTANT.match(lines[index])
    old = lines[index].strip()
    lines[index] = f"{match['indent']}{match['name']} = {steps}"
    return "\n".join(lines), f"line {index + 1} '{old}' -> '{lines[index].strip()}'"


class Trial(NamedTuple):
    first_step: int
    first_loss: float
    last_loss: float
    ms_per_step: float  # train_time / steps at the last validation


def trials_of(output):
    """The trials in a run's output, read by records/logs.py: a trial's val lines start again at step 0, and a
    line's loss is its readout's where it has one (#46's val_ema_loss), as the record is decided."""
    try:
        runs = parse_log_text(output, "the output").runs
    except LogError as e:
        raise RecordError(str(e)) from None
    trials = []
    for run in runs:
        first, last = run.points[0], run.points[-1]
        if last.train_time_s is None:
            raise RecordError(f"the val line of step {last.step} in the output has no train_time, so no time per step")
        trials.append(Trial(first.step, first.val_loss, last.val_loss,
                            1000 * last.train_time_s / last.step if last.step else math.nan))
    return trials


def train_tokens_needed(steps, hp):
    """Tokens of the one train shard: record loaders move to the next shard when pos + batch + 1 >= its length, one
    token more than we read."""
    return steps * hp.batch_tokens + 2


def run(command, cwd, timeout, what):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RecordError(f"{what} ran past --timeout {timeout}s") from e
    if done.returncode != 0:
        raise RecordError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    trials = trials_of(done.stdout)
    if len(trials) != TRIALS:
        raise RecordError(f"{what}: found {len(trials)} trials of val lines in its output, expected {TRIALS}")
    return trials


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record-log", required=True, metavar="PATH", help="a leaderboard log (code, then 100 '=')")
    parser.add_argument("--recipe", choices=sorted(train_gpt.RECIPES), default="aurora",
                        help="our recipe matching the record (default aurora, record #17)")
    parser.add_argument("--steps", type=int, default=50, help="steps of both runs (default 50)")
    parser.add_argument("--device", choices=train_gpt.DEVICE_CHOICES, default="cuda",
                        help="our side's device (the record's is whatever it hard-codes)")
    parser.add_argument("--tiny", action="store_true",
                        help="our CPU preset and shards of its 512-id vocabulary (for a small stand-in record)")
    parser.add_argument("--work", metavar="DIR",
                        help="work folder, kept (default: a new temporary folder, removed at the end)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each side (default 1800)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    train_tokens = train_tokens_needed(args.steps, train_gpt.TINY if args.tiny else train_gpt.FULL)
    if train_tokens > MAX_SHARD_TOKENS:
        parser.error(f"--steps {args.steps} needs {train_tokens:,} train tokens in one shard, more than a shard holds "
                     f"({MAX_SHARD_TOKENS:,})")
    if args.timeout < 1:
        parser.error(f"--timeout must be at least 1 second, got {args.timeout}")
    if os.path.isdir(args.record_log):
        parser.error(f"--record-log {args.record_log} is a folder, not a log file")
    if not os.path.isfile(args.record_log):
        parser.error(f"--record-log {args.record_log}: no such file")
    if args.work:
        check_output_folder(parser, "--work", args.work)
    try:
        train_gpt.resolve_device(args.device, 0)
    except train_gpt.SetupError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        code, edit = read_record_code(args.record_log, args.steps)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The work folder is made only now that every check has passed.
    if args.work:
        return compare(args, Path(args.work).resolve(), code, edit)
    with tempfile.TemporaryDirectory(prefix="versus_record_", ignore_cleanup_errors=True) as work:
        return compare(args, Path(work), code, edit)


def compare(args, work, code, edit):
    """Both sides in `work` on the same shards; the exit status."""
    hp = train_gpt.TINY if args.tiny else train_gpt.FULL
    data = work / "data" / "fineweb10B"
    data.mkdir(parents=True, exist_ok=True)
    vocab = hp.model.vocab_size if args.tiny else GPT2_VOCAB
    train_tokens, val_tokens = train_tokens_needed(args.steps, hp), hp.val_tokens + 2
    val_path, train_path = write_synthetic_shards(str(work / "synthetic"), vocab_size=vocab, train_shards=1,
                                                  tokens_per_shard=train_tokens, val_tokens=val_tokens)
    for source, name in ((val_path, "fineweb_val_000000.bin"), (train_path, "fineweb_train_000001.bin")):
        (data / name).unlink(missing_ok=True)
        os.symlink(source, data / name)
    (work / "record.py").write_text(code)
    kept = "" if args.work else " (a temporary folder, removed at the end; --work DIR keeps it)"
    print(f"record: the code of {args.record_log}, saved as {work / 'record.py'}{kept}; edited: {edit}; nothing "
          f"else changed")
    print(f"data: synthetic shards of vocabulary {vocab} in {data} ({train_tokens:,} train tokens, {val_tokens:,} "
          f"val), for both sides; {args.steps} steps, {TRIALS} trials each, one process under torchrun")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    ours_command = [*torchrun, str(ROOT / "train_gpt.py"), "--recipe", args.recipe, "--steps", str(args.steps),
                    "--trials", str(TRIALS), "--device", args.device, "--no-diagnostics", "--run-id", "ours",
                    "--overwrite",
                    "--train-files", str(data / "fineweb_train_*.bin"), "--val-files", str(data / "fineweb_val_*.bin")]
    if args.tiny:
        ours_command.append("--tiny")
    try:
        record = run([*torchrun, "record.py", str(TRIALS)], work, args.timeout, "the record")
        ours = run(ours_command, work, args.timeout, f"train_gpt.py --recipe {args.recipe}")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, trials in (("record", record), (f"ours ({args.recipe})", ours)):
        for index, trial in enumerate(trials):
            kind = "compile included" if index == 0 else "compile-free"
            print(f"{name:<16} trial {index + 1}: {trial.ms_per_step:9.2f} ms/step ({kind})   val loss step "
                  f"{trial.first_step} {trial.first_loss:.5f}, step {args.steps} {trial.last_loss:.5f}")
    print(f"ms/step, compile-free trial: record {record[-1].ms_per_step:.2f}, ours {ours[-1].ms_per_step:.2f}, "
          f"ours/record {ours[-1].ms_per_step / record[-1].ms_per_step:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Leaderboard submission tools: cut the code out of a log, and check that a log set is complete.

    python records/submission.py extract LOG [-o out.py]
    python records/submission.py check LOG... [--n N]

`extract` writes the code section (everything before the first line of 100 '=') byte for byte, which
is how the leaderboard reproduces a submission. `check` verifies what a submission needs: every log
has a code section and it is the same in every log; every log of ours ran the record's settings (its
`config` line's `is_record_recipe`; the leaderboard's logs have no config line); every run has the same
step count T and stops at the same step, T or a stop inside the schedule such as #42's 2860 of 2900 (no
per-run early stopping); there are n runs (at least N if given); the mean over all runs clears the bar of
docs/benchmark.md#rules-and-statistics, on the readout loss where the logs have one (records/stats.py).
It prints each check and exits 1 if any fails.
"""

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: records/ is not a package

from logs import (LOG_ENCODING, LogError, LogFile, check_each_log_once, parse_log, read_log, runs_of,  # noqa: E402
                  split_code)
from stats import (BAR, TARGET_LOSS, output_file_problem, passing_summary, summarize_result_set,  # noqa: E402
                   unique_values)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def code_digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def check_code(logs: list[LogFile]) -> Check:
    missing = [log.path for log in logs if not log.code]
    if missing:
        return Check("code", False, "no code section (nothing before a line of 100 '=') in: "
                     + ", ".join(missing))
    digests: dict[str, list[str]] = {}
    for log in logs:
        digests.setdefault(code_digest(log.code), []).append(log.path)
    if len(digests) > 1:
        groups = "; ".join(f"sha256 {d}: {', '.join(paths)}" for d, paths in digests.items())
        return Check("code", False, f"the logs hold {len(digests)} different codes: {groups}")
    return Check("code", True, f"the same code in all {len(logs)} log(s) (sha256 {next(iter(digests))})")


def check_record_settings(logs: list[LogFile]) -> Check:
    """A submission is made of record runs: a log whose config line says otherwise (the CPU preset, other
    --steps, --batch-seqs, ...) is refused with what differs, as its `differs_from_record` lists it."""
    not_record = [f"{log.path} ({'; '.join(map(str, config.get('differs_from_record') or ['not listed']))})"
                  for log in logs for config in log.configs if config.get("is_record_recipe") is False]
    if not_record:
        return Check("record", False, "not record runs (is_record_recipe false), differing in: "
                     + ", ".join(not_record))
    said = [log for log in logs if any(config.get("is_record_recipe") is True for config in log.configs)]
    if not said:
        return Check("record", True, "no log has a config line saying is_record_recipe (leaderboard logs): "
                     "settings taken as they are")
    return Check("record", True, f"{len(said)} of {len(logs)} log(s) say is_record_recipe true, none false")


def check_step_counts(logs: list[LogFile]) -> Check:
    runs = runs_of(logs)
    if not runs:
        return Check("steps", False, "no val lines (step:S/T val_loss:X) in any log")
    totals = unique_values(run.total_steps for run in runs)
    if len(totals) > 1:
        per_run = ", ".join(f"{run.path}#{run.trial}: T={run.total_steps}" for run in runs)
        return Check("steps", False, f"runs have different step counts T {totals}: {per_run}")
    stops = unique_values(run.final_step for run in runs)
    if len(stops) > 1:
        early = [f"{run.path}#{run.trial} (last step {run.final_step})" for run in runs if run.final_step != stops[-1]]
        return Check("steps", False, f"runs stop at different steps, {' and '.join(map(str, stops))}: "
                     + ", ".join(early))
    if stops[0] != totals[0]:
        return Check("steps", True, f"every run has T={totals[0]} and stops at step {stops[0]}")
    return Check("steps", True, f"every run trained and validated to step T={totals[0]}")


def check_run_count(logs: list[LogFile], minimum: int | None) -> Check:
    n = len(runs_of(logs))
    if minimum is not None and n < minimum:
        return Check("runs", False, f"{n} run(s), fewer than the required {minimum}")
    if n == 0:
        return Check("runs", False, "no runs")
    required = f" (required: at least {minimum})" if minimum is not None else ""
    return Check("runs", True, f"{n} run(s){required}")


def check_bar(logs: list[LogFile]) -> Check:
    runs = runs_of(logs)
    if not runs:
        return Check("bar", False, "no runs")
    result = summarize_result_set(runs, "submission")
    passed = result.first_passing_step is not None
    return Check("bar", passed, passing_summary(result))


def check_submission(logs: list[LogFile], minimum_runs: int | None) -> list[Check]:
    return [check_code(logs), check_record_settings(logs), check_step_counts(logs),
            check_run_count(logs, minimum_runs), check_bar(logs)]


def extract(log_path: str, out_path: str | None) -> int:
    code, _ = split_code(read_log(log_path))  # the code only: what follows it need not be a well-formed log
    if code is None:
        print(f"error: {log_path} has no line of 100 '=' so it holds no code section; "
              "only logs written by train_gpt.py (or the leaderboard) can be extracted", file=sys.stderr)
        return 1
    if out_path is None:
        sys.stdout.write(code)
        return 0
    # samefile compares the files themselves, so a relative path, a symlink or a hard link to the log counts too.
    if os.path.exists(out_path) and os.path.samefile(out_path, log_path):
        print(f"error: -o {out_path} is the log {log_path} itself; writing the code there would replace the log: "
              "name another file", file=sys.stderr)
        return 2
    problem = output_file_problem(out_path)
    if problem:
        print(f"error: -o {out_path}: {problem}", file=sys.stderr)
        return 2
    try:
        with open(out_path, "w", **LOG_ENCODING) as f:
            f.write(code)
    except OSError as error:
        print(f"error: -o {out_path}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {out_path} ({len(code.splitlines())} lines) from {log_path}", file=sys.stderr)
    return 0


def check(log_paths: list[str], minimum_runs: int | None) -> int:
    check_each_log_once(log_paths)
    checks = check_submission([parse_log(path) for path in log_paths], minimum_runs)
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    failed = [c.name for c in checks if not c.passed]
    print(f"submission {'incomplete: ' + ', '.join(failed) + ' failed' if failed else 'complete'} "
          f"(bar: ({TARGET_LOSS} - L) * sqrt(n) >= {BAR})")
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    extract_parser = commands.add_parser("extract", help="write the code section of a log to a file")
    extract_parser.add_argument("log", metavar="LOG")
    extract_parser.add_argument("-o", "--output", metavar="OUT.py", help="output file (default: stdout)")
    check_parser = commands.add_parser("check", help="check that a log set is a complete submission")
    check_parser.add_argument("logs", nargs="+", metavar="LOG")
    check_parser.add_argument("--n", type=int, metavar="N", help="require at least N runs")
    args = parser.parse_args(argv)
    if args.command == "check" and args.n is not None and args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "extract":
            return extract(args.log, args.output)
        return check(args.logs, args.n)
    except LogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

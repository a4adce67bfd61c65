"""Parse training logs in the leaderboard format (docs/benchmark.md#log-format), ours and the leaderboard's.

A log is: the run's source code, a line of exactly 100 '=', then free-form lines of which these
matter:
- val lines `step:{s}/{T} val_loss:{x} [train_time:{t}s|ms] [step_avg:{a}ms]`; a line with
  `step:0/` starts a new trial (several trials may share one log). Where a recipe evaluates a readout
  of the weights rather than the weights themselves, the line carries both losses, in one of the record
  logs' two layouts: `val_loss:{raw} ... val_ema_loss:{readout}` (#46's Tail-EMA), or
  `val_loss:{readout} ... ref_gamma:{g} ... [raw_val_loss:{raw}]` (#42's reference interpolation; its
  public logs have no raw loss there). A val line the file ends inside (no line end: cut while it was written,
  or truncated) may lack its readout or end inside a number: it is left out, and its run's cut_line says so;
- `diag {json}` lines (our diagnostics, docs/diagnostics.md), attached to the trial they were measured in;
- `config {json}` lines (our resolved configuration, kept with each run; the "recipe" key names the recipe,
  hyperparameters.model.mlp_ratio the MLP width ratio, differs_from_record how the run differs from the record);
- `Running PyTorch ... on {device} with world_size {W}` (the hardware).
Everything else is ignored, so the leaderboard's own logs parse too.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

CODE_SEPARATOR = "=" * 100
VAL_LINE = re.compile(r"step:(\d+)/(\d+)\s+val_loss:(\S*)")
# The name:value fields after val_loss; a name starts after white space, so raw_val_loss is never val_loss.
FIELD = re.compile(r"(?<!\S)(\w+):(\S*)")
READOUT_LOSS = "val_ema_loss"  # #46: the readout's loss, with val_loss the raw one
RAW_LOSS = "raw_val_loss"  # ours for #42-style recipes: the raw loss, with val_loss the readout's
READOUT_APPLIED = "ref_gamma"  # #42: val_loss is the readout's; without raw_val_loss the raw loss is not logged
TRAIN_TIME = re.compile(r"train_time:([0-9.]+)(ms|s)\b")
STEP_AVG = re.compile(r"step_avg:([0-9.]+)ms")
HARDWARE_LINE = re.compile(r"^Running PyTorch .* on (.+) with world_size (\d+)\s*$")
DIAG_PREFIX = "diag "
CONFIG_PREFIX = "config "


class LogError(Exception):
    """A file that cannot be read as a training log; the message names it (and the line) and what to pass."""


@dataclass
class ValPoint:
    step: int
    total_steps: int
    val_loss: float  # the loss the record is decided on: the readout's where one is logged, else the weights'
    raw_val_loss: float | None  # the weights' own loss; None where a readout was applied and this was not logged
    train_time_s: float | None = None
    step_avg_ms: float | None = None


@dataclass
class Run:
    """One trial: its validation points in log order and the diagnostics measured during it."""

    path: str
    trial: int
    recipe: str | None
    hardware: str | None
    points: list[ValPoint] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    mlp_ratio: int | None = None  # None: the log does not say (the benchmark's is 4)
    cut_line: str | None = None  # a val line the log ends inside, left out (on the log's last run)
    config: dict | None = None  # the log's config line (ours), None in the leaderboard's logs

    @property
    def total_steps(self) -> int:
        """T of the trial (from its last val line; every val line of a trial names the same T)."""
        return self.points[-1].total_steps

    @property
    def final_step(self) -> int:
        return self.points[-1].step

    def losses(self, loss: str = "readout") -> dict[int, float]:
        """Per step, the readout loss (what the record is decided on), or with loss="raw" the weights' own loss
        at the steps where it was logged."""
        if loss == "raw":
            return {p.step: p.raw_val_loss for p in self.points if p.raw_val_loss is not None}
        return {p.step: p.val_loss for p in self.points}


@dataclass
class LogFile:
    path: str
    code: str | None  # None when the log has no separator line (no code section)
    runs: list[Run]
    configs: list[dict]
    recipe: str | None
    hardware: str | None


def split_code(text: str) -> tuple[str | None, str]:
    """(code, rest): code is everything before the first line of exactly 100 '=' (line endings
    kept, so the code round-trips byte for byte); (None, text) when there is no such line."""
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == CODE_SEPARATOR:
            return text[:offset], text[offset:]
        offset += len(line)
    return None, text


def number(text: str, quoted: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"'{quoted}': the {name} is not a number") from None


def parse_val_line(line: str) -> ValPoint | None:
    """The point of a val line, None for any other line; ValueError (saying what is wrong) when one of its
    losses is not a number, as in a README that quotes `step:50/50 val_loss:...`."""
    match = VAL_LINE.search(line)
    if match is None:
        return None
    step, total, loss = match.groups()
    val_loss = number(loss, match[0], "val_loss")
    fields = dict(FIELD.findall(line, match.end()))
    losses = {name: number(fields[name], f"{name}:{fields[name]}", name) for name in (READOUT_LOSS, RAW_LOSS)
              if name in fields}
    if READOUT_LOSS in losses:
        readout, raw = losses[READOUT_LOSS], losses.get(RAW_LOSS, val_loss)
    else:
        readout, raw = val_loss, losses.get(RAW_LOSS, None if READOUT_APPLIED in fields else val_loss)
    point = ValPoint(int(step), int(total), readout, raw)
    time_match = TRAIN_TIME.search(line, match.end())
    if time_match is not None:
        seconds = float(time_match.group(1))
        point.train_time_s = seconds / 1000 if time_match.group(2) == "ms" else seconds
    avg_match = STEP_AVG.search(line, match.end())
    if avg_match is not None:
        point.step_avg_ms = float(avg_match.group(1))
    return point


def parse_json_line(line: str, prefix: str) -> dict | None:
    """The JSON object after `prefix`, or None when the line has another prefix or no valid object
    (a malformed diagnostics line must not make a whole result set unreadable)."""
    if not line.startswith(prefix):
        return None
    try:
        value = json.loads(line[len(prefix):])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_hardware(line: str) -> str | None:
    """'8x NVIDIA H100 80GB HBM3' from the header line that names the device and world size."""
    match = HARDWARE_LINE.match(line)
    if match is None:
        return None
    device, world_size = match.groups()
    return f"{world_size}x {device.strip()}"


def mlp_ratio_of(config: dict) -> int | None:
    model = (config.get("hyperparameters") or {}).get("model") or {}
    ratio = model.get("mlp_ratio") if isinstance(model, dict) else None
    return ratio if isinstance(ratio, int) else None


def diag_step(diag: dict) -> int | None:
    step = diag.get("step")
    return step if isinstance(step, int) else None


def parse_log_text(text: str, path: str = "<text>") -> LogFile:
    code, rest = split_code(text)
    runs: list[Run] = []
    configs: list[dict] = []
    recipe = hardware = mlp_ratio = config = None
    # Diagnostics whose step lies before the current trial's latest step were measured in the next
    # trial (written just before its `step:0/` line); they wait here until that trial starts.
    pending_diagnostics: list[dict] = []
    latest_step = -1
    first_line_number = len(code.splitlines()) + 1 if code else 1
    lines = rest.splitlines()
    cut = lines.pop() if lines and not rest.endswith(("\n", "\r")) and VAL_LINE.search(lines[-1]) else None
    for line_number, line in enumerate(lines, first_line_number):
        try:
            point = parse_val_line(line)
        except ValueError as problem:
            raise LogError(f"{path}:{line_number}: {problem}; pass the logs a training run wrote "
                           f"(logs/*.txt)") from None
        if point is not None:
            if point.step == 0 or not runs:
                runs.append(Run(path, len(runs), recipe, hardware, diagnostics=pending_diagnostics,
                                mlp_ratio=mlp_ratio, config=config))
                pending_diagnostics = []
                latest_step = -1
            runs[-1].points.append(point)
            latest_step = max(latest_step, point.step)
            continue
        diag = parse_json_line(line, DIAG_PREFIX)
        if diag is not None:
            step = diag_step(diag)
            belongs_to_next_trial = step is not None and step < latest_step
            if runs and not belongs_to_next_trial and not pending_diagnostics:
                runs[-1].diagnostics.append(diag)
                latest_step = max(latest_step, step if step is not None else -1)
            else:
                pending_diagnostics.append(diag)
            continue
        parsed = parse_json_line(line, CONFIG_PREFIX)
        if parsed is not None:
            config = parsed
            configs.append(config)
            for run in runs:
                run.config = run.config or config
            if isinstance(config.get("recipe"), str):
                recipe = config["recipe"]
                for run in runs:
                    run.recipe = run.recipe or recipe
            mlp_ratio = mlp_ratio_of(config) or mlp_ratio
            for run in runs:
                run.mlp_ratio = run.mlp_ratio or mlp_ratio
            continue
        if hardware is None:
            hardware = parse_hardware(line)
            if hardware is not None:
                for run in runs:
                    run.hardware = hardware
    if runs:
        runs[-1].cut_line = cut
    return LogFile(path, code, runs, configs, recipe, hardware)


# Bytes that are not UTF-8 survive as surrogates, so even such a log's code round-trips exactly.
LOG_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


def read_log_text(path: str | Path) -> str:
    """The file's text with its line endings untouched (newline='')."""
    with open(path, **LOG_ENCODING) as f:
        return f.read()


def read_log(path: str | Path) -> str:
    """The text of the log file at `path`; LogError when it is missing, a folder or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise LogError(f"{path} is a folder, not a log file; pass the log files in it, e.g. {path / '*.txt'}")
    if not path.is_file():
        raise LogError(f"log file not found: {path} (pass paths to logs/*.txt files)")
    try:
        return read_log_text(path)
    except OSError as error:
        raise LogError(f"{path}: cannot read it: {error.strerror or error}") from None


def check_each_log_once(paths: list[str]) -> None:
    """LogError for a file given twice, under any name (a relative path, a symlink, a hard link): its runs would
    count twice, and the bar's sqrt(n) would rise with them."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            continue  # missing or unreadable: parse_log says so
        file = (status.st_dev, status.st_ino)
        if file in seen:
            raise LogError(f"{path} is {seen[file]} again: every log is one set of runs, counted once (twice would "
                           "inflate n); give each log once")
        seen[file] = path


def parse_log(path: str | Path) -> LogFile:
    return parse_log_text(read_log(path), str(path))


def runs_of(log_files: list[LogFile]) -> list[Run]:
    return [run for log in log_files for run in log.runs]

"""Statistics that decide a record (docs/benchmark.md#rules-and-statistics) over one or two sets of logs,
plus figures.

    python records/stats.py LOG... [--vs LOG...] [--plot out.png] [--markdown] [--json]
                            [--diagnostics] [--plot-diagnostics out.png] [--label A] [--vs-label B]

Every trial of every log is one run. Per validation step: mean, sample std (ddof=1; null for a
single run) and n over the runs that logged that step. The reported step is the smallest step
logged by ALL runs whose mean clears `(3.28 - L) * sqrt(n) >= 0.004`; a step that some runs did
not log (a crashed run, a different T) cannot be the reported step, since its mean is not over all
n runs. With --vs, the pairwise bar (same page) compares the first set (a) with the second (b) at
their reported steps; its statistic is positive when a is better and null when either set never
clears the bar.

The loss is the one the record is decided on: where a recipe evaluates a readout of the weights (#46's
Tail-EMA `val_ema_loss`, #42's reference interpolation), the readout's; `--loss raw` takes the weights'
own loss instead (records/logs.py says which field is which).

A run whose log stops before its T cannot change the result once the set clears the bar: the reported
step is one every run logged, and a run's losses up to it do not depend on when it stopped later (#42
stops every run at 2860 of 2900, #46 one run at 2765). Such stops get a note. When the set does not
clear the bar, the steps a run did not log could decide it: a warning, exit status 1.

Exit status: 0; 1 when the result is undecided: the set does not clear the bar and some run's log stops
before its T (crashed, killed, still running, or stopped early), or with --loss raw some steps before
the reported one have no raw loss (everything is printed, with a warning naming the logs); 2 when a log
or figure path is unusable (nothing is computed).
"""

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: records/ is not a package

from logs import RAW_LOSS, READOUT_APPLIED, LogError, Run, check_each_log_once, parse_log, runs_of  # noqa: E402

TARGET_LOSS = 3.28
BAR = 0.004  # one-sided z-test with sigma 0.0013 at p < 0.001 (docs/benchmark.md#rules-and-statistics)
LOSS_PER_STEP = 0.0045 / 100  # the leaderboard's measured slope near the target (same section)
# Logged losses are decimals (5 places); comparisons allow for the float error of their arithmetic so
# that a mean sitting exactly on the bar counts as clearing it, as `>=` says.
FLOAT_SLACK = 1e-12
LOSSES = ("readout", "raw")  # what Run.losses returns: the loss the record is decided on, or the weights' own


@dataclass
class StepStats:
    mean: float
    std: float | None  # sample std (ddof=1); None with a single run
    n: int


@dataclass
class ResultSet:
    label: str
    runs: list[Run]
    steps: dict[int, StepStats]
    first_passing_step: int | None
    mean_at_first_passing_step: float | None
    loss: str = "readout"  # LOSSES

    @property
    def n(self) -> int:
        return len(self.runs)

    def steps_without_raw_loss(self) -> list[int]:
        """Steps at which some run applied a readout and logged no raw loss."""
        return sorted({p.step for run in self.runs for p in run.points if p.raw_val_loss is None})

    def raw_gaps(self) -> list[int]:
        """With loss="raw", the steps without a raw loss before the reported step (all of them when there is none):
        the raw crossing may lie there, unseen."""
        if self.loss != "raw":
            return []
        first = self.first_passing_step
        return [step for step in self.steps_without_raw_loss() if first is None or step < first]


def decimal_mean(values: list[float]) -> float:
    """The mean of logged numbers, summed as the decimals the log wrote (repr gives back that text) rather
    than as binary floats: the #17 log's step-3175 mean is exactly 3.278845, and float summation leaves it
    at 3.2788449999999996, which would round to 3.27884 instead of 3.27885."""
    return float(sum(Decimal(repr(value)) for value in values) / len(values))


def step_stats(values: list[float]) -> StepStats:
    std = statistics.stdev(values) if len(values) > 1 else None
    return StepStats(decimal_mean(values), std, len(values))


def mean_over_runs_by_step(per_run: list[dict[int, float]]) -> dict[int, StepStats]:
    """Per step, in step order, the statistics over the runs that have a value there."""
    by_step: dict[int, list[float]] = {}
    for values in per_run:
        for step, value in values.items():
            by_step.setdefault(step, []).append(value)
    return {step: step_stats(v) for step, v in sorted(by_step.items())}


def summarize_steps(runs: list[Run], loss: str = "readout") -> dict[int, StepStats]:
    return mean_over_runs_by_step([run.losses(loss) for run in runs])


def bar_statistic(mean_loss: float, n: int) -> float:
    """(3.28 - L) * sqrt(n) of docs/benchmark.md#rules-and-statistics."""
    return (TARGET_LOSS - mean_loss) * math.sqrt(n)


def clears_bar(statistic: float) -> bool:
    return statistic >= BAR - FLOAT_SLACK


def first_passing_step(steps: dict[int, StepStats], n_runs: int) -> int | None:
    """Smallest step, logged by all n_runs runs, whose mean clears the bar; None if there is none."""
    for step, stats in sorted(steps.items()):
        if stats.n == n_runs and clears_bar(bar_statistic(stats.mean, n_runs)):
            return step
    return None


def pairwise_statistic(step_a: int, loss_a: float, n_a: int,
                       step_b: int, loss_b: float, n_b: int) -> float:
    """The pairwise bar of docs/benchmark.md#rules-and-statistics:
    ((L_B - L_A) + (S_B - S_A) * 0.0045/100) / sqrt(1/n_A + 1/n_B); positive when A is better (lower loss, fewer steps)."""
    return ((loss_b - loss_a) + (step_b - step_a) * LOSS_PER_STEP) / math.sqrt(1 / n_a + 1 / n_b)


def compare(a: ResultSet, b: ResultSet) -> dict:
    if a.first_passing_step is None or b.first_passing_step is None:
        return {"statistic": None, "significant": None}
    statistic = pairwise_statistic(a.first_passing_step, a.mean_at_first_passing_step, a.n,
                                   b.first_passing_step, b.mean_at_first_passing_step, b.n)
    return {"statistic": statistic, "significant": clears_bar(statistic)}


def summarize_result_set(runs: list[Run], label: str, loss: str = "readout") -> ResultSet:
    steps = summarize_steps(runs, loss)
    step = first_passing_step(steps, len(runs))
    mean = steps[step].mean if step is not None else None
    return ResultSet(label, runs, steps, step, mean, loss)


def load_result_set(paths: list[str], label: str, loss: str = "readout") -> ResultSet:
    runs = runs_of([parse_log(path) for path in paths])
    if not runs:
        raise LogError(f"no val lines (step:S/T val_loss:X) in {', '.join(paths)}; "
                       "pass the logs/*.txt files a training run wrote")
    return summarize_result_set(runs, label, loss)


def unique_values(values) -> list:
    return sorted({v for v in values if v is not None})


def recipe_of(result: ResultSet) -> str | None:
    """The set's recipe when all its runs name the same one."""
    recipes = {run.recipe for run in result.runs}
    return recipes.pop() if len(recipes) == 1 else None


def consistency_warnings(result: ResultSet) -> list[str]:
    """Pooling runs of different recipes or lengths is legal arithmetic but rarely what was meant; a log that ends
    inside a val line was cut short."""
    warnings = []
    recipes = unique_values(run.recipe for run in result.runs)
    if len(recipes) > 1:
        warnings.append(f"set {result.label}: runs of different recipes are pooled: {recipes}")
    totals = unique_values(run.total_steps for run in result.runs)
    if len(totals) > 1:
        warnings.append(f"set {result.label}: runs have different step counts T: {totals}")
    warnings += [f"set {result.label}: {run.path} ends inside a val line ({run.cut_line!r}): cut while it was written, "
                 f"or truncated; that line is left out" for run in result.runs if run.cut_line]
    groups = configurations(result.runs)
    if len(groups) > 1:
        common = common_differences(groups)
        pooled = " | ".join(f"{configuration_name(key, common)} ({len(runs)} runs)" for key, runs in groups.items())
        warnings.append(f"set {result.label}: runs of {len(groups)} configurations are pooled: {pooled}; "
                        f"--by-config tabulates them apart")
    partial = [step for step, s in result.steps.items() if s.n < result.n]
    if partial:
        warnings.append(f"set {result.label}: {len(partial)} step(s) not logged by every run "
                        f"(e.g. {partial[:5]}); they cannot be the reported step")
    return warnings


def early_stops(result: ResultSet) -> list[str]:
    """One line per step at which runs stop before their T, saying whether that matters: not when the set clears
    the bar (every run logged the reported step and the steps before it), but otherwise the steps not logged could
    decide the result."""
    stops: dict[tuple[int, int], list[Run]] = {}
    for run in result.runs:
        if run.final_step != run.total_steps:
            stops.setdefault((run.final_step, run.total_steps), []).append(run)
    if result.first_passing_step is None:
        consequence = ("and the set does not clear the bar before that: the steps not logged could decide the result "
                       "(crashed, killed, still running or stopped early)")
    else:
        consequence = (f"at or after the reported step {result.first_passing_step}: every run logged the steps up "
                       f"to it, so the result stands")
    lines = []
    for (final, total), runs in sorted(stops.items()):
        which = "" if len(runs) == result.n else " (" + ", ".join(f"{r.path} trial {r.trial}" for r in runs) + ")"
        verb = "stops before its" if len(runs) == 1 else "stop before their"
        lines.append(f"set {result.label}: {len(runs)} of {result.n} runs {verb} T={total}, at step {final}{which}, "
                     f"{consequence}")
    return lines


def undecided_warnings(result: ResultSet) -> list[str]:
    """Why the set's result is not final: runs whose logs stop before their T when the set does not clear the bar,
    and with loss="raw" steps before the reported one without a raw loss."""
    warnings = early_stops(result) if result.first_passing_step is None else []
    gaps = result.raw_gaps()
    if gaps:
        lacking = sorted({run.path for run in result.runs for p in run.points
                          if p.step in gaps and p.raw_val_loss is None})
        where = "every log" if len(lacking) == len({run.path for run in result.runs}) else ", ".join(lacking)
        warnings.append(f"set {result.label}: at step(s) {gaps} a readout was applied ({READOUT_APPLIED}) and no raw "
                        f"loss logged ({RAW_LOSS}) in {where}: the raw crossing may lie there, so it is undecided")
    return warnings




# ---- by configuration: the runs of one recipe grouped by their config's differences from the record, each
# group against the one the others add to (bash run.sh --ablate's table) ----

def configuration_of(run: Run) -> tuple:
    """(recipe, its config's differences from the record): None for the differences of a log without a config
    line (the leaderboard's)."""
    differences = (run.config or {}).get("differs_from_record")
    return run.recipe or "unknown", tuple(differences) if isinstance(differences, list) else None


def configurations(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(configuration_of(run), []).append(run)
    return groups


def common_differences(groups) -> set[str]:
    """The differences every configuration shares (the preset's, the horizon's): said once, not per group."""
    known = [set(differences) for _, differences in groups if differences is not None]
    return set.intersection(*known) if known else set()


def without_record_value(difference: str) -> str:
    """A difference without its ' (record: ...)' tail: what the configuration does."""
    return difference.split(" (record: ")[0]


def configuration_name(key: tuple, common: set[str]) -> str:
    recipe, differences = key
    if differences is None:
        return f"{recipe} without a config line"
    own = [without_record_value(d) for d in differences if d not in common]
    return f"{recipe}: {'; '.join(own)}" if own else f"{recipe} as its record" if not differences else recipe


def comparison_step(runs: list[Run]) -> int | None:
    """The step the record's runs cleared the bar at (its configs' record_step, scaled to the runs'
    horizon) or, where not every run logged it, the last step before it that every run logged; without one in
    the configs, the last step every run logged."""
    common = set.intersection(*(set(run.losses()) for run in runs))
    steps = {(run.config or {}).get("record_step") for run in runs}
    target = steps.pop() if len(steps) == 1 else None
    below = [step for step in common if target is None or step <= target]
    return max(below) if below else None


def reading(statistic: float, difference: str | None) -> str:
    """The verdict on a positive statistic (the reference better) at the bar: of the technique an arm leaves out
    (helps: leaving it out hurts), else of the arm's own change."""
    if not (clears_bar(statistic) or clears_bar(-statistic)):
        return "undecided"
    if difference is not None and difference.startswith("without "):
        return f"{difference.split()[1]} {'helps' if statistic > 0 else 'hurts'}"
    return "hurts" if statistic > 0 else "helps"


def by_configuration(runs: list[Run]) -> list[dict]:
    """Per recipe, a row per configuration: n, mean and sd of the readout and raw losses at the comparison step,
    and against the reference (the configuration whose differences every other one has, else the one with
    fewest) the leaderboard's pairwise statistic: at both first passing steps (of the readout loss) where both
    clear the bar, else at the comparison step; its reading at 0.004 and the difference of the passing steps."""
    rows = []
    by_recipe: dict[str, dict] = {}
    for key, group in configurations(runs).items():
        by_recipe.setdefault(key[0], {})[key] = group
    for recipe, groups in by_recipe.items():
        keys = list(groups)
        contained = [k for k in keys if all(set(k[1] or ()) <= set(o[1] or ()) for o in keys)]
        reference = (contained or sorted(keys, key=lambda k: len(k[1] or ())))[0]
        common = common_differences(groups)
        step = comparison_step([run for group in groups.values() for run in group])
        sets = {key: (summarize_result_set(group, configuration_name(key, common)),
                      summarize_result_set(group, configuration_name(key, common), "raw")) for key, group in groups.items()}
        base, _ = sets[reference]
        for key in [reference] + [k for k in keys if k != reference]:
            readout, raw = sets[key]
            own = [d for d in key[1] or () if d not in set(reference[1] or ())]
            row = {"recipe": recipe, "configuration": configuration_name(key, common), "common": sorted(common),
                   "reference": key == reference, "n": readout.n, "step": step,
                   "readout": readout.steps.get(step), "raw": raw.steps.get(step),
                   "statistic": None, "compared_at": None, "step_difference": None, "reading": None}
            if key != reference and step is not None:
                if base.first_passing_step is not None and readout.first_passing_step is not None:
                    row["statistic"] = compare(base, readout)["statistic"]
                    row["step_difference"] = readout.first_passing_step - base.first_passing_step
                    row["compared_at"] = "first passing steps"
                else:
                    row["statistic"] = pairwise_statistic(step, base.steps[step].mean, base.n,
                                                          step, readout.steps[step].mean, readout.n)
                    row["compared_at"] = f"step {step}"
                row["reading"] = reading(row["statistic"], own[0] if len(own) == 1 else None)
            rows.append(row)
    return rows


def by_configuration_report(rows: list[dict], markdown: bool = False) -> str:
    def mean_sd(stats: StepStats | None) -> str:
        return "-" if stats is None else f"{stats.mean:.5f} ± {fmt(stats.std)}"
    header = ["configuration", "n", "readout loss (mean ± sd)", "raw loss (mean ± sd)", "passing steps vs reference",
              "statistic", "compared at", "reading"]
    lines = []
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        mine = [row for row in rows if row["recipe"] == recipe]
        step = mine[0]["step"]
        common = "; ".join(without_record_value(d) for d in mine[0]["common"]) or "none"
        lines += [f"{'### ' if markdown else '== '}{recipe}: runs grouped by their differences from the record, "
                  f"losses at step {step}, each against the reference (first row); the statistic is positive when "
                  f"the reference is better, decided at {BAR}", f"Every run: {common}.", ""]
        cells = [[row["configuration"] + (" (reference)" if row["reference"] else ""), str(row["n"]),
                  mean_sd(row["readout"]), mean_sd(row["raw"]),
                  "-" if row["step_difference"] is None else f"{row['step_difference']:+d}",
                  "-" if row["statistic"] is None else f"{row['statistic']:+.5f}", row["compared_at"] or "-",
                  row["reading"] or "-"] for row in mine]
        if markdown:
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(c) + " |" for c in cells]
        else:
            widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + cells]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def by_configuration_json(rows: list[dict]) -> list[dict]:
    def plain(stats):
        return None if stats is None else {"mean": stats.mean, "std": stats.std, "n": stats.n}
    return [{**row, "readout": plain(row["readout"]), "raw": plain(row["raw"])} for row in rows]


def steady_step_time_ms(run: Run) -> float | None:
    """ms per training step after the first validation interval (which holds the compilation)."""
    timed = [p for p in run.points if p.train_time_s is not None and p.step > 0]
    if len(timed) < 2 or timed[-1].step == timed[0].step:
        return None
    first, last = timed[0], timed[-1]
    return 1000 * (last.train_time_s - first.train_time_s) / (last.step - first.step)


def mean_step_time_ms(result: ResultSet) -> float | None:
    times = [t for t in (steady_step_time_ms(run) for run in result.runs) if t is not None]
    return statistics.fmean(times) if times else None


def hardware_of(result: ResultSet) -> str | None:
    hardware = unique_values(run.hardware for run in result.runs)
    return ", ".join(hardware) if hardware else None


def display_name(result: ResultSet) -> str:
    recipe = recipe_of(result)
    name = result.label if recipe is None or recipe == result.label else f"{result.label}: {recipe}"
    return f"{name} (n={result.n})"


# ---- diagnostics (docs/diagnostics.md) ----

NEURON_FIELDS = ("dead_fraction", "nearly_dead_fraction", "low_power_fraction", "train_dead_fraction",
                 "train_nearly_dead_fraction", "train_low_power_fraction")
LEVERAGE_FIELDS = ("cv", "max_over_min", "starved_fraction")
FATE_FIELDS = ("ever_dead_fraction", "permanent_fraction", "revived_fraction")
# fc_updates values, per fc matrix, divided by the steps of their validation interval.
FC_UPDATE_FIELDS = ("dead_update_norm", "live_update_norm", "dead_preact_change", "live_preact_change")


def diagnostics_of_kind(run: Run, kind: str) -> list[dict]:
    return [d for d in run.diagnostics if d.get("kind") == kind and isinstance(d.get("step"), int)]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def per_matrix_entries(value) -> list[dict]:
    """Every object inside a leverage line that carries a CV, whatever the nesting (one line per
    matrix, or a dict / list of matrices), so the summary does not depend on the exact layout."""
    if isinstance(value, dict):
        own = [value] if is_number(value.get("cv")) else []
        return own + [e for v in value.values() if isinstance(v, (dict, list))
                      for e in per_matrix_entries(v)]
    if isinstance(value, list):
        return [e for v in value for e in per_matrix_entries(v)]
    return []


def neuron_series(run: Run, field_name: str) -> dict[int, float]:
    return {d["step"]: float(d[field_name]) for d in diagnostics_of_kind(run, "neurons")
            if is_number(d.get(field_name))}


def leverage_series(run: Run, field_name: str) -> dict[int, float]:
    """Per step, the mean of a leverage statistic over the matrices reported at that step."""
    values: dict[int, list[float]] = {}
    for diag in diagnostics_of_kind(run, "leverage"):
        for entry in per_matrix_entries(diag):
            if is_number(entry.get(field_name)):
                values.setdefault(diag["step"], []).append(float(entry[field_name]))
    return {step: statistics.fmean(v) for step, v in values.items()}


def fate_series(run: Run, field_name: str) -> dict[int, float]:
    return {d["step"]: float(d[field_name]) for d in diagnostics_of_kind(run, "fate")
            if is_number(d.get(field_name))}


def permanent_share_series(run: Run) -> dict[int, float]:
    """Per step, the share of the units ever seen dead that have stayed dead at every probe since."""
    return {d["step"]: d["permanent_fraction"] / d["ever_dead_fraction"] for d in diagnostics_of_kind(run, "fate")
            if is_number(d.get("permanent_fraction")) and is_number(d.get("ever_dead_fraction"))
            and d["ever_dead_fraction"] > 0}


def pooled_fc_updates(run: Run) -> dict[int, dict[str, float]]:
    """Per fc_updates line (by step): each value as the mean over the dead (or live) rows of all fc
    matrices together, divided by the steps of its validation interval; a dead-row value only where
    some row was dead. Adds dead_over_live_update_norm, the dead rows' mean update norm over the
    live rows' (1: dead rows move as much as live ones)."""
    pooled = {}
    for diag in diagnostics_of_kind(run, "fc_updates"):
        since, matrices = diag.get("since_step"), diag.get("matrices")
        if not (isinstance(since, int) and diag["step"] > since and isinstance(matrices, dict)):
            continue
        sums: dict[str, float] = {}
        rows: dict[str, int] = {}
        for matrix in matrices.values():
            for name in FC_UPDATE_FIELDS:
                count = matrix.get(f"{name.split('_')[0]}_rows")
                if is_number(matrix.get(name)) and is_number(count) and count > 0:
                    sums[name] = sums.get(name, 0.0) + matrix[name] * count
                    rows[name] = rows.get(name, 0) + count
        values = {name: sums[name] / rows[name] / (diag["step"] - since) for name in sums}
        if values.get("dead_update_norm") is not None and values.get("live_update_norm"):
            values["dead_over_live_update_norm"] = values["dead_update_norm"] / values["live_update_norm"]
        pooled[diag["step"]] = values
    return pooled


def fc_update_series(run: Run, field_name: str) -> dict[int, float]:
    return {step: values[field_name] for step, values in pooled_fc_updates(run).items() if field_name in values}


def group_name(run: Run, label: str | None, show_ratio: bool) -> str:
    name = run.recipe or "unknown"
    if show_ratio:
        name += f" mlp×{run.mlp_ratio or '?'}"
    return f"{label}:{name}" if label else name


def diagnostics_groups(results: list[ResultSet]) -> dict[str, list[Run]]:
    """Runs grouped by recipe ('unknown' without a config line) and, when the runs differ in MLP
    ratio, by ratio too; prefixed by the set's label when two sets are compared."""
    runs = [run for result in results for run in result.runs]
    show_ratio = len({run.mlp_ratio or 4 for run in runs}) > 1
    groups: dict[str, list[Run]] = {}
    for result in results:
        label = result.label if len(results) > 1 else None
        for run in result.runs:
            groups.setdefault(group_name(run, label, show_ratio), []).append(run)
    return groups


def summarize_diagnostics(results: list[ResultSet]) -> dict[str, dict[str, dict[int, StepStats]]]:
    """{group: {statistic: {step: mean over runs}}}: dead/nearly-dead neuron fractions, the mean over
    matrices of each leverage statistic, the fate fractions, and the fc update values per step
    (means over the dead or live rows of all fc matrices); statistics no run reported are left out."""
    summary = {}
    for name, runs in diagnostics_groups(results).items():
        series = {f: mean_over_runs_by_step([neuron_series(r, f) for r in runs])
                  for f in NEURON_FIELDS}
        series |= {f"leverage_{f}": mean_over_runs_by_step([leverage_series(r, f) for r in runs])
                   for f in LEVERAGE_FIELDS}
        series |= {f: mean_over_runs_by_step([fate_series(r, f) for r in runs]) for f in FATE_FIELDS}
        series["permanent_of_ever_dead"] = mean_over_runs_by_step([permanent_share_series(r) for r in runs])
        series |= {f"fc_{f}_per_step": mean_over_runs_by_step([fc_update_series(r, f) for r in runs])
                   for f in FC_UPDATE_FIELDS}
        series["fc_dead_over_live_update_norm"] = mean_over_runs_by_step(
            [fc_update_series(r, "dead_over_live_update_norm") for r in runs])
        summary[name] = {f: s for f, s in series.items() if s}
    return summary


# ---- per-unit records (train_gpt.UnitRecords: <run id>.units.npz beside the log) ----

def units_path(log_path: str) -> Path:
    return Path(log_path).with_suffix(".units.npz")


def load_unit_records(log_path: str) -> dict:
    """{"probe_tokens": N, trial: {"steps": (probes,), "{val|train}_firing_rate": (probes, layers, units),
    "{val|train}_power_over_layer_mean": same, "{val|train}_layer_mean_power": (probes, layers)}}, as float32."""
    import numpy as np  # only the per-unit records need it

    path = units_path(log_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-unit records beside {log_path} (written by train_gpt.py since the "
                                f"--probe-tokens diagnostics)")
    records: dict = {}
    with np.load(path) as arrays:
        for key in arrays.files:
            if key == "probe_tokens":
                records[key] = int(arrays[key])
                continue
            trial, name = key.split(".", 1)
            values = arrays[key]
            records.setdefault(int(trial.removeprefix("trial")), {})[name] = (
                values if values.dtype.kind == "i" else values.astype(np.float32))
    return records


def unit_fractions(firing_rate, power_over_layer_mean, nearly_dead_rate: float = 0.001,
                   low_power: float = 0.01) -> dict[str, float]:
    """The three definitions of docs/diagnostics.md#neuron-death from one probe's per-unit records
    ((layers, units) arrays), as the mean over layers of each layer's fraction: never fires, fires on
    fewer than `nearly_dead_rate` of the tokens, output power below `low_power` of the layer's mean."""
    return {"dead_fraction": float((firing_rate == 0).mean(axis=1).mean()),
            "nearly_dead_fraction": float((firing_rate < nearly_dead_rate).mean(axis=1).mean()),
            "low_power_fraction": float((power_over_layer_mean < low_power).mean(axis=1).mean())}


# ---- output ----

def fmt(value: float | None, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def steps_json(steps: dict[int, StepStats]) -> dict:
    return {str(step): {"mean": s.mean, "std": s.std, "n": s.n} for step, s in steps.items()}


def result_json(result: ResultSet) -> dict:
    return {"loss": result.loss, "n": result.n, "first_passing_step": result.first_passing_step,
            "mean_at_first_passing_step": result.mean_at_first_passing_step,
            "steps": steps_json(result.steps), "steps_without_raw_loss": result.steps_without_raw_loss()}


def diagnostics_json(summary: dict) -> dict:
    return {group: {f: {str(step): {"mean": s.mean, "n": s.n} for step, s in series.items()}
                    for f, series in series_by_field.items()}
            for group, series_by_field in summary.items()}


def passing_summary(result: ResultSet) -> str:
    gaps = result.raw_gaps()
    undecided = f"; steps {gaps} lack a raw loss, so the raw crossing is undecided" if gaps else ""
    if result.first_passing_step is None:
        if gaps:
            return f"the raw loss never clears the bar at a step every run logged it{undecided}"
        return f"never clears the bar ({TARGET_LOSS} - L) * sqrt(n) >= {BAR} at a step logged by all runs"
    mean = result.mean_at_first_passing_step
    return (f"first passing step {result.first_passing_step}, mean val loss {mean:.5f}, "
            f"({TARGET_LOSS} - L) * sqrt(n) = {bar_statistic(mean, result.n):.5f} with n={result.n}{undecided}")


def pairwise_line(pairwise: dict, a: ResultSet, b: ResultSet) -> str:
    if pairwise["statistic"] is None:
        return f"pairwise {a.label} vs {b.label}: undefined (a set never clears the bar)"
    verdict = "significant" if pairwise["significant"] else "not significant"
    return (f"pairwise {a.label} vs {b.label}: statistic {pairwise['statistic']:.5f} "
            f"(positive favours {a.label}; >= {BAR} is significant): {verdict}")


def text_report(result: ResultSet) -> str:
    which = ", the raw loss (--loss raw)" if result.loss == "raw" else ""
    lines = [f"== {display_name(result)}: {len(result.runs)} run(s) from "
             f"{len({run.path for run in result.runs})} log(s){which}",
             f"{'step':>6} {'mean':>9} {'std':>9} {'n':>4}"]
    lines += [f"{step:>6} {s.mean:>9.5f} {fmt(s.std):>9} {s.n:>4}" for step, s in result.steps.items()]
    lines.append(f"{display_name(result)}: {passing_summary(result)}")
    return "\n".join(lines)


def markdown_summary_row(result: ResultSet) -> str:
    step = result.first_passing_step
    std = result.steps[step].std if step is not None else None
    totals = unique_values(run.total_steps for run in result.runs)
    step_time = mean_step_time_ms(result)
    cells = [recipe_of(result) or result.label, "/".join(map(str, totals)),
             "never" if step is None else str(step), str(result.n),
             fmt(result.mean_at_first_passing_step), fmt(std),
             "-" if step_time is None else f"{step_time:.1f} ms", hardware_of(result) or "-"]
    return "| " + " | ".join(cells) + " |"


def markdown_report(results: list[ResultSet], pairwise: dict | None) -> str:
    lines = ["| recipe | train steps | reported step | n | mean val loss | std | step time | hardware |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [markdown_summary_row(result) for result in results]
    if pairwise is not None:
        lines += ["", pairwise_line(pairwise, *results)]
    for result in results:
        lines += ["", f"{display_name(result)}, val loss per step:", "",
                  "| step | mean | std | n |", "| --- | --- | --- | --- |"]
        lines += [f"| {step} | {s.mean:.5f} | {fmt(s.std)} | {s.n} |"
                  for step, s in result.steps.items()]
    return "\n".join(lines)


DIAGNOSTICS_TABLES = {
    "neurons and leverage": list(NEURON_FIELDS) + [f"leverage_{f}" for f in LEVERAGE_FIELDS],
    "neuron fate": [*FATE_FIELDS, "permanent_of_ever_dead"],
    "fc updates per step, dead vs live rows": [f"fc_{f}_per_step" for f in FC_UPDATE_FIELDS]
                                              + ["fc_dead_over_live_update_norm"],
}


def diagnostics_table(series: dict) -> list[str]:
    names = list(series)
    steps = sorted({step for s in series.values() for step in s})
    lines = [f"{'step':>6}  " + "  ".join(names)]
    for step in steps:
        cells = ["-" if step not in series[name] else f"{series[name][step].mean:.5g}" for name in names]
        lines.append(f"{step:>6}  " + "  ".join(f"{c:>{len(n)}}" for c, n in zip(cells, names)))
    return lines


def diagnostics_report(summary: dict) -> str:
    lines = []
    for group, series in summary.items():
        if not series:
            lines += [f"== diagnostics, {group} (mean over runs)", "no diag lines"]
        for table, names in DIAGNOSTICS_TABLES.items():
            present = {name: series[name] for name in names if name in series}
            if present:
                lines += [f"== diagnostics, {group}: {table} (mean over runs)", *diagnostics_table(present)]
    return "\n".join(lines)


# ---- figures ----

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; works on machines without a display
    import matplotlib.pyplot as plt
    return plt


def zoom_start(results: list[ResultSet]) -> int:
    """The zoomed panel shows where the bar is decided: the last 15% of the longest run, extended
    back to the earliest first passing step."""
    start = int(0.85 * max(run.total_steps for result in results for run in result.runs))
    passing = [r.first_passing_step for r in results if r.first_passing_step is not None]
    return min([start, *passing])


def curve_ylim(results: list[ResultSet]) -> tuple[float, float]:
    """From just below the lower of 3.28 and the lowest mean up to the highest mean after step 0:
    the step-0 loss (ln 50304 = 10.8) would flatten everything else."""
    means = [s.mean for r in results for step, s in r.steps.items() if step > 0]
    means = means or [s.mean for r in results for s in r.steps.values()]
    low, high = min(min(means), TARGET_LOSS), max(max(means), TARGET_LOSS)
    margin = 0.05 * (high - low) + 0.01
    return low - margin, high + margin


def plot_curves(results: list[ResultSet], path: str) -> None:
    plt = pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    start = zoom_start(results)
    for result in results:
        steps = list(result.steps)
        means = [s.mean for s in result.steps.values()]
        line, = full.plot(steps, means, label=display_name(result))
        tail = [step for step in steps if step >= start]
        tail_means = [result.steps[step].mean for step in tail]
        tail_stds = [result.steps[step].std or 0.0 for step in tail]
        zoom.plot(tail, tail_means, marker=".", color=line.get_color(), label=display_name(result))
        zoom.fill_between(tail, [m - s for m, s in zip(tail_means, tail_stds)],
                          [m + s for m, s in zip(tail_means, tail_stds)],
                          color=line.get_color(), alpha=0.15)
        if result.first_passing_step is not None:
            zoom.axvline(result.first_passing_step, color=line.get_color(), linestyle=":")
    for ax in (full, zoom):
        ax.axhline(TARGET_LOSS, color="black", linestyle="--", linewidth=1, label=str(TARGET_LOSS))
        ax.set_xlabel("step")
        ax.set_ylabel("mean val loss")
        ax.grid(alpha=0.3)
    full.set_ylim(*curve_ylim(results))
    full.set_title("val loss (mean over runs)")
    zoom.set_title(f"zoom: steps >= {start} (band: ±1 std; dotted: first passing step)")
    zoom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group_styles(groups: list[str]) -> dict[str, dict]:
    """One hue per recipe; a recipe's groups of other MLP ratios get its lighter shade, drawn wider."""
    plt = pyplot()
    palette = plt.get_cmap("tab20").colors
    bases: dict[str, int] = {}
    styles = {}
    for group in groups:
        base = group.split(" mlp×")[0]
        shade = sum(other.split(" mlp×")[0] == base for other in styles)
        hue = bases.setdefault(base, len(bases))
        styles[group] = {"color": palette[(2 * hue + min(shade, 1)) % len(palette)],
                         "linewidth": 1.5 + 0.8 * min(shade, 1)}
    return styles


def plot_series(ax, series: dict, name: str, style: dict, linestyle: str, label: str | None):
    if name in series:
        ax.plot(list(series[name]), [s.mean for s in series[name].values()], linestyle=linestyle, label=label,
                **style)


# The panels of the diagnostics figure: (title, y label, [(statistic, line style)], y scale). The
# last four need the fate and fc_updates lines, and are drawn when some group has them.
BASIC_PANELS = [
    ("MLP neurons dead (solid) and nearly dead (dashed)", "fraction of units",
     [("dead_fraction", "-"), ("nearly_dead_fraction", "--")], "linear"),
    ("leverage: starved-row fraction, mean over matrices", "fraction of rows",
     [("leverage_starved_fraction", "-")], "linear"),
]
FATE_PANELS = [
    ("fate: ever dead (dashed), permanent (solid), revived (dotted)", "fraction of units",
     [("ever_dead_fraction", "--"), ("permanent_fraction", "-"), ("revived_fraction", ":")], "linear"),
    ("fc update norm per step: live rows (solid), dead rows (dashed)", "mean row norm of the weight change",
     [("fc_live_update_norm_per_step", "-"), ("fc_dead_update_norm_per_step", "--")], "log"),
    ("fc update norm, dead rows / live rows (1: as large)", "ratio of mean row norms",
     [("fc_dead_over_live_update_norm", "-")], "ratio"),
    ("pre-activation change per step: live (solid), dead (dashed)", "mean change on the probe tokens",
     [("fc_live_preact_change_per_step", "-"), ("fc_dead_preact_change_per_step", "--")], "symlog"),
]


def plot_diagnostics(summary: dict, path: str) -> None:
    plt = pyplot()
    with_fate = any(name in series for series in summary.values()
                    for name in ("permanent_fraction", "fc_dead_over_live_update_norm"))
    panels = ([BASIC_PANELS[0], FATE_PANELS[0], BASIC_PANELS[1], *FATE_PANELS[1:]] if with_fate
              else BASIC_PANELS)
    rows = 2 if with_fate else 1
    fig, axes = plt.subplots(rows, len(panels) // rows, figsize=(6.5 * len(panels) // rows, 4.6 * rows),
                             squeeze=False)
    styles = group_styles(list(summary))
    for ax, (title, ylabel, lines, scale) in zip(axes.flat, panels):
        for group, series in summary.items():
            for k, (name, linestyle) in enumerate(lines):
                plot_series(ax, series, name, styles[group], linestyle, group if k == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        values = [s.mean for series in summary.values() for name, _ in lines if name in series
                  for s in series[name].values()]
        if scale == "symlog" and values:  # signed values over decades: logarithmic down to 1/1000 of the largest
            largest = max(abs(v) for v in values) or 1.0
            ax.set_yscale("symlog", linthresh=largest / 1000)
            # Ticks at 0 and the decades outside the linear band only: inside it they crowd the 0 label.
            decades = [10.0 ** k for k in range(math.floor(math.log10(largest / 100)), math.ceil(math.log10(largest)) + 1)]
            ax.set_yticks([-d for d in reversed(decades) if -d >= 10 * min(values)] + [0]
                          + [d for d in decades if d <= 10 * max(values)])
            ax.axhline(0, color="black", linewidth=0.8)
        elif scale == "log" and values:
            ax.set_yscale("log")
        elif scale == "ratio" and values:  # log only when the ratios span more than a decade
            ax.axhline(1, color="black", linewidth=0.8)
            if min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")
    handles = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6),
                   frameon=False)
    fig.suptitle("diagnostics, mean over runs (colour: group)")
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log files of set a (each trial is a run)")
    parser.add_argument("--vs", nargs="+", metavar="LOG", help="log files of set b for the pairwise test")
    parser.add_argument("--label", default="a", help="name of the first set (default: a)")
    parser.add_argument("--vs-label", help="name of the --vs set (default: b)")
    parser.add_argument("--loss", choices=LOSSES, default="readout",
                        help="readout (default): the loss the record is decided on, val_ema_loss where logged, else "
                             "val_loss (with ref_gamma, #42's readout); raw: the weights' own loss, raw_val_loss where "
                             "logged, else val_loss (none where ref_gamma is logged without raw_val_loss)")
    parser.add_argument("--plot", metavar="PNG", help="write mean val-loss curves to this PNG")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    output.add_argument("--markdown", action="store_true", help="print markdown tables for a records README")
    parser.add_argument("--diagnostics", action="store_true",
                        help="summarize diag lines (dead neurons, leverage) per recipe")
    parser.add_argument("--plot-diagnostics", metavar="PNG", help="plot the diagnostics summary to this PNG")
    parser.add_argument("--by-config", action="store_true",
                        help="group the runs by their config's differences from the record and compare each group "
                             "with the one the others add to (as bash run.sh --ablate does)")
    args = parser.parse_args(argv)
    if args.by_config and args.vs:
        parser.error("--by-config groups the runs itself; leave out --vs")
    if args.vs_label is not None and not args.vs:
        parser.error("--vs-label names the --vs set; give --vs LOG... too")
    if args.vs_label is None:
        args.vs_label = "b"
    if args.vs and args.label == args.vs_label:
        parser.error(f"--label and --vs-label are both '{args.label}'; give the sets two names")
    if args.plot and args.plot_diagnostics and os.path.realpath(args.plot) == os.path.realpath(args.plot_diagnostics):
        parser.error(f"--plot and --plot-diagnostics both name {args.plot}; give each figure its own file")
    for flag, path in (("--plot", args.plot), ("--plot-diagnostics", args.plot_diagnostics)):
        problem = path and figure_path_problem(path)
        if problem:
            parser.exit(2, f"error: {flag} {path}: {problem}\n")
    return args


def figure_formats() -> list[str]:
    """The extensions matplotlib writes a figure to by itself: all it lists but pgf, which needs a LaTeX install."""
    from matplotlib.backend_bases import FigureCanvasBase
    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})


def output_file_problem(path: str) -> str | None:
    """Why a file cannot be written at `path` (checked before any work), or None."""
    if os.path.isdir(path):
        return f"{path} is a folder; name a file"
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it or write elsewhere"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return None


def figure_path_problem(path: str) -> str | None:
    """Why a figure cannot be written at `path` (checked before any work), or None."""
    extension = Path(path).suffix.lower().removeprefix(".")
    formats = figure_formats()
    if extension not in formats:
        problem = f"matplotlib writes no '.{extension}' files" if extension else \
            "the name has no extension to say the format"
        return f"{problem}; name it with one of {', '.join('.' + f for f in formats)}"
    return output_file_problem(path)


def write_figure(flag: str, path: str, plot, *plot_args) -> bool:
    try:
        plot(*plot_args, path)
    except OSError as error:
        print(f"error: {flag} {path}: {error.strerror or error}", file=sys.stderr)
        return False
    print(f"wrote {path}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_each_log_once(args.logs + (args.vs or []))
        results = [load_result_set(args.logs, args.label, args.loss)]
        if args.vs:
            results.append(load_result_set(args.vs, args.vs_label, args.loss))
    except LogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pairwise = compare(*results) if len(results) == 2 else None
    undecided = [line for result in results for line in undecided_warnings(result)]
    for result in results:
        for warning in consistency_warnings(result):
            print(f"warning: {warning}", file=sys.stderr)
    for line in undecided:
        print(f"warning: {line}", file=sys.stderr)
    for result in results:
        if result.first_passing_step is not None:
            for note in early_stops(result):
                print(f"note: {note}", file=sys.stderr)
    diagnostics = (summarize_diagnostics(results)
                   if args.diagnostics or args.plot_diagnostics else None)

    if args.by_config:
        rows = by_configuration(results[0].runs)
        print(json.dumps(by_configuration_json(rows), indent=1) if args.json else
              by_configuration_report(rows, args.markdown))
        return 1 if undecided else 0
    if args.json:
        payload = ({"a": result_json(results[0]), "b": result_json(results[1]), "pairwise": pairwise}
                   if pairwise is not None else result_json(results[0]))
        if args.diagnostics:
            payload["diagnostics"] = diagnostics_json(diagnostics)
        print(json.dumps(payload, indent=1))
    elif args.markdown:
        print(markdown_report(results, pairwise))
    else:
        print("\n\n".join(text_report(result) for result in results))
        if pairwise is not None:
            print(pairwise_line(pairwise, *results))
    if args.diagnostics and not args.json:
        print(diagnostics_report(diagnostics))
    if args.plot and not write_figure("--plot", args.plot, plot_curves, results):
        return 2
    if args.plot_diagnostics and not write_figure("--plot-diagnostics", args.plot_diagnostics, plot_diagnostics,
                                                  diagnostics):
        return 2
    return 1 if undecided else 0


if __name__ == "__main__":
    sys.exit(main())

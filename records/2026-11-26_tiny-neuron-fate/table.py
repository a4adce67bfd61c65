"""The README's table, computed from this folder's logs with records/stats.py's own summaries:
    python records/2026-11-26_tiny-neuron-fate/table.py records/2026-11-26_tiny-neuron-fate/fate-*.txt"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stats  # noqa: E402


def mean_over_steps(series: dict, steps) -> float | None:
    """Time average of a per-step series over `steps` (the intervals that had dead rows)."""
    values = [series[step].mean for step in steps if step in series]
    return statistics.fmean(values) if values else None


def scaled(value: float | None) -> str:
    return stats.fmt(None if value is None else value * 1e3, 2)


def row(path: str) -> str:
    result = stats.load_result_set([path], Path(path).stem)
    (summary,) = stats.summarize_diagnostics([result]).values()
    run = result.runs[0]
    last = max(result.steps)

    def at_end(name, digits=3):
        return stats.fmt(summary[name][last].mean if name in summary and last in summary[name] else None, digits)

    dead_steps = list(summary.get("fc_dead_update_norm_per_step", {}))
    cells = [run.recipe, str(run.mlp_ratio), str(result.n), stats.fmt(result.steps[last].mean, 4),
             at_end("dead_fraction"), at_end("ever_dead_fraction"), at_end("permanent_fraction"),
             at_end("revived_fraction"), at_end("permanent_of_ever_dead"),
             stats.fmt(mean_over_steps(summary.get("fc_dead_over_live_update_norm", {}), dead_steps), 2),
             scaled(mean_over_steps(summary.get("fc_dead_preact_change_per_step", {}), dead_steps)),
             scaled(mean_over_steps(summary.get("fc_live_preact_change_per_step", {}), dead_steps))]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print("| recipe | MLP ratio | n | val loss at T | dead at T | ever dead | permanent | revived | permanent / ever dead "
          "| dead/live update norm | dead pre-act change per step (1e-3) | live pre-act change per step (1e-3) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in sys.argv[1:]:
        print(row(path))

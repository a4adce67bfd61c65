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


def rows(paths: list[str]) -> list[str]:
    """One row per recipe and MLP ratio, each value a mean over its runs (val loss: mean ± std)."""
    result = stats.load_result_set(paths, "all")
    summaries = stats.summarize_diagnostics([result])
    lines = []
    for name, runs in stats.diagnostics_groups([result]).items():
        summary, losses = summaries[name], stats.summarize_steps(runs)
        last = max(losses)
        loss = f"{losses[last].mean:.4f}" + ("" if losses[last].std is None else f" ± {losses[last].std:.4f}")

        def at_end(field):
            return stats.fmt(summary[field][last].mean if last in summary.get(field, {}) else None, 3)

        dead_steps = list(summary.get("fc_dead_update_norm_per_step", {}))
        cells = [runs[0].recipe, str(runs[0].mlp_ratio), str(len(runs)), loss,
                 at_end("dead_fraction"), at_end("ever_dead_fraction"), at_end("permanent_fraction"),
                 at_end("revived_fraction"), at_end("permanent_of_ever_dead"),
                 stats.fmt(mean_over_steps(summary.get("fc_dead_over_live_update_norm", {}), dead_steps), 2),
                 scaled(mean_over_steps(summary.get("fc_dead_preact_change_per_step", {}), dead_steps)),
                 scaled(mean_over_steps(summary.get("fc_live_preact_change_per_step", {}), dead_steps))]
        lines.append("| " + " | ".join(cells) + " |")
    return sorted(lines)


if __name__ == "__main__":
    print("| recipe | MLP ratio | n | val loss at T | dead at T | ever dead | permanent | revived | permanent / ever dead "
          "| dead/live update norm | dead pre-act change per step (1e-3) | live pre-act change per step (1e-3) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows(sys.argv[1:])))

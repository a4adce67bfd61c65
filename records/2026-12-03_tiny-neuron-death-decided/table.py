"""The README's tables, verdict and figure, computed from this folder's logs (and their per-unit records):
    python records/2026-12-03_tiny-neuron-death-decided/table.py records/2026-12-03_tiny-neuron-death-decided/death-*.txt \
        [--plot figure.png]
A log whose run did not reach the decision step is listed as cut and left out."""

import argparse
import statistics
import sys
from pathlib import Path

from scipy.stats import ttest_ind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import logs  # noqa: E402
import stats  # noqa: E402

DECISION_STEP = 500
LOW, HIGH = 0.05, 0.25  # the rule's thresholds on the primary measure
ARMS = {"a": "as is", "b": "frozen MLP scalars", "c": "SwiGLU", "d": "AdamW groups of aurora"}
MEASURES = [  # (column, neurons field or scalar-path statistic)
    ("dead (primary)", "dead_fraction"), ("< 0.1% firing", "nearly_dead_fraction"),
    ("low power", "low_power_fraction"), ("train: dead", "train_dead_fraction"),
    ("train: < 0.1%", "train_nearly_dead_fraction"), ("train: low power", "train_low_power_fraction"),
    ("norm gain", "norm_gain_mean"), ("fc bias", "fc_bias_mean"), ("val loss", "val_loss")]
# The comparisons the results state, when both cells have runs: (cell, cell, why).
COMPARISONS = [(("aurora", "a"), ("muon", "a"), "the claim: Muon kills more than Aurora"),
               (("aurora", "b"), ("muon", "b"), "the same with the scalar path frozen"),
               (("aurora", "a"), ("aurora", "b"), "what the scalar path does under Aurora"),
               (("muon", "a"), ("muon", "b"), "what the scalar path does under Muon"),
               (("normuon", "a"), ("aurora", "a"), "NorMuon against Aurora"),
               (("normuon", "a"), ("normuon", "b"), "what the scalar path does under NorMuon"),
               (("muon", "d"), ("muon", "a"), "Muon with Aurora's AdamW groups"),
               (("normuon", "d"), ("normuon", "a"), "NorMuon with Aurora's AdamW groups"),
               (("aurora", "c"), ("muon", "c"), "the claim with SwiGLU MLPs")]


def arm_of(config: dict) -> str:
    if config.get("freeze_mlp_scalars"):
        return "b"
    if config["hyperparameters"]["model"].get("mlp") == "swiglu":
        return "c"
    if config.get("aux_from"):
        return "d"
    return "a"


def run_values(path: str) -> tuple[tuple[str, str], int, dict] | None:
    """((recipe, arm), seed, {field: value at the decision step}), or None when the run did not reach it."""
    log = logs.parse_log(path)
    (config,) = log.configs
    (run,) = log.runs
    at = {d["kind"]: d for d in run.diagnostics if d.get("step") == DECISION_STEP}
    if "neurons" not in at or DECISION_STEP not in run.losses():
        return None
    values = {field: at["neurons"][field] for _, field in MEASURES if field in at["neurons"]}
    for field in ("norm_gain_mean", "fc_bias_mean"):
        values[field] = statistics.fmean(at["scalars"][field])
    values["val_loss"] = run.losses()[DECISION_STEP]
    return (config["recipe"], arm_of(config)), config["seed"], values


def cell_stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else None
    return f"{statistics.fmean(values):.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return None
    result = ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def verdict(means: dict) -> str:
    """The pre-registered rule of the README, in its order, on the mean primary measure per cell."""
    aurora_a, muon_a, aurora_b = means.get(("aurora", "a")), means.get(("muon", "a")), means.get(("aurora", "b"))
    if aurora_b is not None and aurora_b > HIGH:
        return f"counterexample: Aurora with frozen scalars has {aurora_b:.1%} dead (> 25%)"
    if aurora_a is None or muon_a is None:
        return "undecided: the cells aurora (a) and muon (a) are not both measured"
    if aurora_a < LOW and muon_a > HIGH:
        return f"reproduces the claim in kind: Aurora {aurora_a:.1%} (< 5%), Muon {muon_a:.1%} (> 25%)"
    if aurora_a < LOW and muon_a < LOW:
        return f"the preset cannot test it: Aurora {aurora_a:.1%} and Muon {muon_a:.1%} both < 5%"
    failed = [f"Aurora {aurora_a:.1%} is not < 5%"] if aurora_a >= LOW else []
    failed += [f"Muon {muon_a:.1%} is not > 25%"] if muon_a <= HIGH else []
    return "not reproduced: " + "; ".join(failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--plot", metavar="PNG", help="write the figure: each definition over the steps, per cell")
    args = parser.parse_args(argv)
    cells: dict = {}
    seeds: dict = {}
    cut = []
    for path in sorted(args.logs):
        found = run_values(path)
        if found is None:
            cut.append(Path(path).name)
            continue
        cell, seed, values = found
        cells.setdefault(cell, []).append(values)
        seeds.setdefault(cell, []).append(seed)
    order = sorted(cells, key=lambda c: ("aurora", "muon", "normuon").index(c[0]) + 10 * "abdc".index(c[1]))
    print(f"Step {DECISION_STEP}; mean ± sd over the runs (seeds = init and data seed); fractions of MLP units.\n")
    print("| recipe | arm | n (seeds) | " + " | ".join(name for name, _ in MEASURES) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in MEASURES) + " |")
    for cell in order:
        row = [cell[0], f"({cell[1]}) {ARMS[cell[1]]}", f"{len(cells[cell])} ({', '.join(map(str, seeds[cell]))})"]
        row += [cell_stats([v[field] for v in cells[cell]]) for _, field in MEASURES]
        print("| " + " | ".join(row) + " |")
    print("\nWelch t-tests (two-sided), primary measure and the other definitions:\n")
    print("| comparison | why | " + " | ".join(f"{name}: t, p" for name, _ in MEASURES[:3]) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in MEASURES[:3]) + " |")
    for first, second, why in COMPARISONS:
        if first in cells and second in cells:
            tests = [welch([v[f] for v in cells[first]], [v[f] for v in cells[second]]) for _, f in MEASURES[:3]]
            shown = ["-" if t is None else f"{t[0]:.2f}, {t[1]:.2g}" for t in tests]
            print(f"| {first[0]} ({first[1]}) vs {second[0]} ({second[1]}) | {why} | " + " | ".join(shown) + " |")
    means = {cell: statistics.fmean(v["dead_fraction"] for v in values) for cell, values in cells.items()}
    print(f"\nVerdict by the pre-registered rule: {verdict(means)}.")
    if cut:
        print(f"\nCut (did not reach step {DECISION_STEP}): {', '.join(cut)}")
    if args.plot:
        plot(sorted(args.logs), args.plot)
    return 0


def plot(paths: list[str], path: str) -> None:
    """Per cell, the mean over its runs of each definition (val probe) and of the mean norm gain, over the steps."""
    series: dict = {}
    for log_path in paths:
        log = logs.parse_log(log_path)
        (config,) = log.configs
        (run,) = log.runs
        cell = (config["recipe"], arm_of(config))
        for diag in run.diagnostics:
            if diag.get("kind") == "neurons":
                for field in ("dead_fraction", "nearly_dead_fraction", "low_power_fraction"):
                    series.setdefault((cell, field), {}).setdefault(diag["step"], []).append(diag[field])
            if diag.get("kind") == "scalars":
                series.setdefault((cell, "norm_gain"), {}).setdefault(diag["step"], []).append(
                    statistics.fmean(diag["norm_gain_mean"]))
    plt = stats.pyplot()
    panels = [("dead_fraction", "never fires on 65,536 val tokens"), ("nearly_dead_fraction", "fires on < 0.1%"),
              ("low_power_fraction", "output power < 1% of layer mean"), ("norm_gain", "MLP input norm gain, mean")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colors = {"aurora": "tab:blue", "muon": "tab:red", "normuon": "tab:green"}
    styles = {"a": "-", "b": "--", "c": ":", "d": "-."}
    cells = sorted({cell for cell, _ in series})
    for ax, (field, title) in zip(axes, panels):
        for cell in cells:
            points = series.get((cell, field), {})
            steps = sorted(points)
            n = min(len(points[s]) for s in steps) if steps else 0
            ax.plot(steps, [statistics.fmean(points[s]) for s in steps], styles[cell[1]], color=colors[cell[0]],
                    marker="o", label=f"{cell[0]} ({cell[1]}) {ARMS[cell[1]]}, n={n}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if field != "norm_gain":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(LOW, color="gray", linewidth=0.8)
            ax.axhline(HIGH, color="gray", linewidth=0.8)
    axes[0].set_ylabel("fraction of MLP units (mean over runs)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

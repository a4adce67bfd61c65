"""The study's table (README.md) from its logs, in Markdown:

    python records/2026-12-07_tiny-ablation-soap-muon/table.py records/2026-12-07_tiny-ablation-soap-muon/*.txt \
        > records/2026-12-07_tiny-ablation-soap-muon/table.md

Per arm, from records/stats.py --by-config (the table bash run.sh --ablate prints): n, mean ± sd of the readout
and raw val loss at the record's step, the pairwise statistic against the recipe and its reading at 0.004, which
is the pre-registered verdict; beside them, deciding nothing, Welch's t and two-sided p of the readout losses
(scipy). Runs missing from an arm (cut, crashed) are counted: the verdicts need every arm at seeds 0, 1 and 2.
"""

import sys
from pathlib import Path

from scipy import stats as tests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # records/: stats.py, logs.py
import stats  # noqa: E402
from logs import parse_log, runs_of  # noqa: E402

SEEDS = (0, 1, 2)


def seed_of(run):
    return (run.config or {}).get("seed")


def main(paths):
    runs = [run for run in runs_of([parse_log(path) for path in paths]) if run.final_step == run.total_steps]
    groups = stats.configurations(runs)
    common = stats.common_differences(groups)
    by_name = {stats.configuration_name(key, common): group for key, group in groups.items()}
    rows = stats.by_configuration(runs)
    step = rows[0]["step"]
    reference = by_name[rows[0]["configuration"]]
    lines = [f"Losses at step {step} (the record's 2690 of 2900 at this horizon), mean ± sd over the seeds; the statistic "
             f"is positive when the recipe is better; reading at {stats.BAR} (the verdict). Every run: "
             f"{'; '.join(stats.without_record_value(d) for d in sorted(common))}.", "",
             "| arm | seeds | readout loss | raw loss | statistic | verdict | Welch t | p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    incomplete = []
    for row in rows:
        group = by_name[row["configuration"]]
        seeds = sorted(seed_of(run) for run in group)
        if seeds != list(SEEDS):
            incomplete.append(f"{row['configuration']}: seeds {seeds}")
        welch = "- | -"
        if not row["reference"]:
            losses = [run.losses()[step] for run in group]
            t, p = tests.ttest_ind(losses, [run.losses()[step] for run in reference], equal_var=False)
            welch = f"{t:+.2f} | {p:.2g}"
        # The arm by what it leaves out (the norm_float32 arm's model also differs, by that very switch).
        left_out = [part for part in row["configuration"].split(": ", 1)[-1].split("; ") if part.startswith("without ")]
        arm = "soap-muon" if row["reference"] else "; ".join(left_out)
        lines.append(f"| {arm} | {', '.join(map(str, seeds))} | "
                     f"{row['readout'].mean:.5f} ± {stats.fmt(row['readout'].std)} | "
                     f"{row['raw'].mean:.5f} ± {stats.fmt(row['raw'].std)} | "
                     f"{'-' if row['statistic'] is None else format(row['statistic'], '+.5f')} | "
                     f"{row['reading'] or 'reference'} | {welch} |")
    lines += ["", f"Arms without all of seeds {list(SEEDS)} (their verdicts do not count): "
              f"{'; '.join(incomplete) if incomplete else 'none'}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

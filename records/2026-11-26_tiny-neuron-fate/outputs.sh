#!/usr/bin/env bash
# Every output of this folder from its logs, run from the repository root after run.sh (and run-seed1.sh):
#     bash records/2026-11-26_tiny-neuron-fate/outputs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-11-26_tiny-neuron-fate
python=${PYTHON:-python}
: > $out/stats.txt
for group in aurora-r4 aurora-r8 muon-r4 muon-r8 normuon-r4 normuon-r8; do
    logs=$(ls $out/fate-$group.txt $out/fate-$group-seed*.txt 2>/dev/null || true)
    [ -n "$logs" ] && $python records/stats.py $logs --label $group >> $out/stats.txt && echo >> $out/stats.txt
done
$python records/stats.py $out/fate-*.txt --diagnostics | sed -n '/^== diagnostics/,$p' > $out/diagnostics.txt
$python records/stats.py $out/fate-*.txt --plot-diagnostics $out/diagnostics.png > /dev/null
$python $out/table.py $out/fate-*.txt > $out/table.md

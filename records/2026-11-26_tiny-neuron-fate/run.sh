#!/usr/bin/env bash
# Every training command of this study, run from the repository root:
#     nice -n 5 bash records/2026-11-26_tiny-neuron-fate/run.sh
# One process per recipe x MLP ratio, one after another, most important first (the Aurora / Muon
# pair at both ratios, then NorMuon); the logs land in this folder, and times.txt gets each
# process's wall-clock start and end. One trial each and one thread (OMP_NUM_THREADS=1): see the
# README for why.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-11-26_tiny-neuron-fate
python=${PYTHON:-python}
export OMP_NUM_THREADS=1
$python data/synthetic.py
for run in aurora:4 muon:4 aurora:8 muon:8 normuon:4 normuon:8; do
    recipe=${run%:*} ratio=${run#*:}
    id=fate-$recipe-r$ratio
    echo "$id start $(date -u +%FT%TZ)" >> $out/times.txt
    $python train_gpt.py --tiny --steps 300 --recipe $recipe --mlp-ratio $ratio --trials 1 --run-id $id
    mv logs/$id.txt $out/
    echo "$id end $(date -u +%FT%TZ)" >> $out/times.txt
done

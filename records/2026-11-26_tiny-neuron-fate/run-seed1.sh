#!/usr/bin/env bash
# Run after run.sh, as time allowed: a second initialization (--seed 1) of the Aurora / Muon pair at
# MLP ratio 4, so the pair the mechanism is about has n=2.
#     nice -n 5 bash records/2026-11-26_tiny-neuron-fate/run-seed1.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-11-26_tiny-neuron-fate
python=${PYTHON:-python}
export OMP_NUM_THREADS=1
for recipe in aurora muon; do
    id=fate-$recipe-r4-seed1
    echo "$id start $(date -u +%FT%TZ)" >> $out/times.txt
    $python train_gpt.py --tiny --steps 300 --recipe $recipe --mlp-ratio 4 --seed 1 --trials 1 --run-id $id
    mv logs/$id.txt $out/
    echo "$id end $(date -u +%FT%TZ)" >> $out/times.txt
done

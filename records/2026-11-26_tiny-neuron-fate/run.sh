#!/usr/bin/env bash
# Every training command of this study, run from the repository root:
#     nice -n 5 bash records/2026-11-26_tiny-neuron-fate/run.sh
# One process per recipe x MLP ratio, 3 trials each (one compile); the logs land in this folder,
# and times.txt gets each process's wall-clock start and end.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-11-26_tiny-neuron-fate
python=${PYTHON:-python}
$python data/synthetic.py
for recipe in aurora muon normuon; do
    for ratio in 4 8; do
        id=fate-$recipe-r$ratio
        echo "$id start $(date -u +%FT%TZ)" >> $out/times.txt
        $python train_gpt.py --tiny --steps 300 --recipe $recipe --mlp-ratio $ratio --trials 3 --run-id $id
        mv logs/$id.txt $out/
        echo "$id end $(date -u +%FT%TZ)" >> $out/times.txt
    done
done

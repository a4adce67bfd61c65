#!/usr/bin/env bash
# Run after run.sh and run-seed1.sh: the remaining initializations, so that every recipe x MLP ratio has
# seeds 0, 1 and 2 (n=3). Two processes at a time, one thread each (the box has 2 cores).
#     bash records/2026-11-26_tiny-neuron-fate/run-more-seeds.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-11-26_tiny-neuron-fate
python=${PYTHON:-python}
export OMP_NUM_THREADS=1
$python data/synthetic.py > /dev/null
one() {  # recipe ratio seed
    local id=fate-$1-r$2-seed$3
    echo "$id start $(date -u +%FT%TZ)" >> $out/times.txt
    $python train_gpt.py --tiny --steps 300 --recipe "$1" --mlp-ratio "$2" --seed "$3" --trials 1 --run-id "$id" \
        > /dev/null
    mv "logs/$id.txt" $out/
    echo "$id end $(date -u +%FT%TZ)" >> $out/times.txt
}
runs=(aurora:4:2 muon:4:2 normuon:4:1 normuon:4:2 aurora:8:1 muon:8:1 normuon:8:1 aurora:8:2 muon:8:2 normuon:8:2)
for ((i = 0; i < ${#runs[@]}; i += 2)); do
    for run in "${runs[@]:i:2}"; do
        IFS=: read -r recipe ratio seed <<< "$run"
        one "$recipe" "$ratio" "$seed" &
    done
    wait
done

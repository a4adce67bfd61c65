#!/usr/bin/env bash
# The study's runs, from the repository root, in the README's order (the order is the cut):
#     nohup bash records/2026-12-03_tiny-neuron-death-decided/run.sh > /dev/null 2>&1 &
# Two workers take the next run from the queue as they finish one, each run on one thread; a log and its
# per-unit records (.units.npz) land in this folder when the run ends, times.txt gets each start and end.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-12-03_tiny-neuron-death-decided
python=${PYTHON:-python}
export OMP_NUM_THREADS=1
$python data/synthetic.py

queue=$out/queue.txt
: > "$queue"
add() {  # add RECIPE ARM SEED...: one line per seed
    local recipe=$1 arm=$2; shift 2
    for seed in "$@"; do echo "$recipe $arm $seed" >> "$queue"; done
}
for seed in 0 1 2; do
    for arm in a b; do for recipe in aurora muon; do add $recipe $arm $seed; done; done
done
for seed in 0 1 2; do for arm in a b; do add normuon $arm $seed; done; done
for seed in 0 1 2; do for recipe in muon normuon; do add $recipe d $seed; done; done
for seed in 0 1 2; do for recipe in aurora muon normuon; do add $recipe c $seed; done; done

arm_flags() {
    case $1 in
        a) ;;
        b) echo --freeze-mlp-scalars ;;
        c) echo --mlp swiglu ;;
        d) echo --aux-from aurora ;;
    esac
}

worker() {
    while true; do
        local line
        line=$(flock "$queue.lock" bash -c "head -n 1 '$queue' && sed -i 1d '$queue'")
        [ -n "$line" ] || return 0
        read -r recipe arm seed <<< "$line"
        local id=death-$recipe-$arm-s$seed
        echo "$id start $(date -u +%FT%TZ)" >> $out/times.txt
        # shellcheck disable=SC2046
        $python train_gpt.py --tiny --steps 3200 --stop-at 500 --probe-tokens 65536 --probe-every 100 \
            --recipe "$recipe" --seed "$seed" --data-seed "$seed" $(arm_flags "$arm") --run-id "$id" \
            > "$out/$id.console" 2>&1 || echo "$id failed $(date -u +%FT%TZ)" >> $out/times.txt
        mv logs/$id.txt logs/$id.units.npz $out/ 2>/dev/null || true
        echo "$id end $(date -u +%FT%TZ)" >> $out/times.txt
    done
}
worker & worker & wait
rm -f "$queue" "$queue.lock"

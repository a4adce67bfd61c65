#!/usr/bin/env bash
# The first minutes on a lent GPU, in one command and under one deadline:
#   bash benchmarks/gpu_check.sh            # one CUDA GPU, no network; ends within DEADLINE_S (default 600 s)
#   bash benchmarks/gpu_check.sh --smoke    # the same stages at tiny size on the CPU (CI runs this)
# Stages: 1. setup (run.sh --setup) and the environment (device, torch, CUDA, cuDNN, triton);
#   2. pytest -m cuda (skipped tests on a CPU); 3. for each of the five recipes, a 10-step full-size run of
#   train_gpt.py under torchrun with --ddp (DDP's wrapper, hook and no_sync and the matrix optimizer's
#   all-gathers at world size 1) on full-vocabulary synthetic shards, logging recompiles and graph breaks;
#   4. benchmarks/step.py for aurora, muon, aurora-ema-ref and soap-muon. Each stage gets at most its share
#   of the deadline (stages 2 and 3 are capped so that 4 keeps about 90 s); a stage that fails or runs out
#   of time is marked so and the next one runs. Everything lands in OUT (default logs/gpu_check; $OUT if set):
#   one file per stage and summary.txt, which this script prints at the end. Exit status: 0 when every
#   stage passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

fail() { echo "gpu_check.sh: $*" >&2; exit 2; }
# Everything is checked before the first stage: nothing runs or is written for a refused call.
[ $# -le 1 ] || fail "one argument at most (--smoke, or nothing), got $#"
smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *) fail "unknown argument '$1' (use --smoke for the CPU run, or nothing)" ;;
esac
OUT=${OUT:-logs/gpu_check}
DEADLINE_S=${DEADLINE_S:-600}
# A stage with 5 s or less left is skipped (stage), so a shorter deadline could only skip them all.
if ! [[ "$DEADLINE_S" =~ ^[0-9]+$ ]] || [ "$((10#$DEADLINE_S))" -le 5 ]; then
  fail "DEADLINE_S must be a whole number of seconds above 5 (each stage needs more), got '$DEADLINE_S'"
fi
if ! mkdir -p "$OUT" 2>/dev/null || ! [ -w "$OUT" ]; then
  fail "OUT=$OUT: cannot make or write that folder; set OUT to a writable folder"
fi
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

if [ "$smoke" = 1 ]; then
  device=cpu vocab=512 steps=3 size=(--tiny --probe-tokens 4096) bench_size=(--tiny --iters 1 --warmup 0)
  batch_tokens=4096 val_tokens=16385
  export TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=1  # CPU compiles take minutes; the flags are what CI checks
else
  device=cuda vocab=50257 steps=10 size=() bench_size=(--iters 5 --warmup 2)
  batch_tokens=524288 val_tokens=10485761
fi
DATA="$OUT/data"

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# stage NAME FILE CAP COMMAND...: runs COMMAND for at most CAP seconds and what is left of the deadline,
# output to FILE; notes the result.
stage() {
  local name=$1 file=$2 cap=$3; shift 3
  local budget t0 rc
  budget=$(left)
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -le 5 ]; then note "[$name] SKIPPED: the ${DEADLINE_S}s deadline has passed"; failed=1; return 1; fi
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" > "$OUT/$file" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then note "[$name] ok (${took}s, $file)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note "[$name] TIMED OUT after ${took}s (deadline; $file)"; failed=1
  else note "[$name] FAILED, exit $rc (${took}s; last lines of $file below)"; tail -n 5 "$OUT/$file" | sed 's/^/    /' | tee -a "$SUMMARY"; failed=1
  fi
  return "$rc"
}

note "gpu_check $( [ "$smoke" = 1 ] && echo "--smoke (tiny, CPU)" || echo "(full size, CUDA)" ) at $(date -u +%FT%TZ), deadline ${DEADLINE_S}s, results in $OUT"

# ---- 1. setup and environment
stage setup setup.txt 60 bash run.sh --setup && sed 's/^/    /' "$OUT/setup.txt" | tee -a "$SUMMARY"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
stage environment environment.txt 30 "$PY" - "$device" <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, {torch.cuda.device_count()} visible")
elif sys.argv[1] == "cuda":
    sys.exit("torch sees no CUDA GPU")
else:
    print(f"device cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
EOF
sed 's/^/    /' "$OUT/environment.txt" | tee -a "$SUMMARY"

# Shards for stage 3, written on the CPU while the tests run: one train shard of `steps` batches (every
# recipe's run reads the same ones), the val shard.
"$PY" data/synthetic.py --out "$DATA" --vocab-size "$vocab" --train-shards 1 \
  --tokens-per-shard $(( steps * batch_tokens + 2 )) --val-tokens "$val_tokens" > "$OUT/shards.txt" 2>&1 &
shards_pid=$!

# ---- 2. the CUDA tests
stage "pytest -m cuda" pytest_cuda.txt 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs
grep -E '^\s*\[cuda\]|passed|skipped|failed|error' "$OUT/pytest_cuda.txt" | tail -n 20 | sed 's/^/    /' | tee -a "$SUMMARY"

# ---- 3. the trainer under torchrun, DDP at world size 1, every recipe, recompiles and graph breaks logged
if ! wait "$shards_pid"; then
  note "[shards] FAILED (shards.txt)"; failed=1
else
  for recipe in aurora normuon muon aurora-ema-ref soap-muon; do
    TORCH_LOGS=recompiles,graph_breaks stage "train_gpt.py $recipe $steps steps --ddp" "train-$recipe.txt" 60 \
      "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py "${size[@]}" --device "$device" \
      --recipe "$recipe" --ddp --steps "$steps" --run-id "gpu_check-$recipe" --overwrite \
      --train-files "$DATA/synthetic_train_*.bin" --val-files "$DATA/synthetic_val_*.bin"
    grep -E '^Running|val_loss|^done|^error' "$OUT/train-$recipe.txt" | sed 's/^/    /' | tee -a "$SUMMARY"
    note "    recompiles logged: $(grep -c 'Recompiling' "$OUT/train-$recipe.txt"), graph breaks logged: $(grep -ci 'graph break' "$OUT/train-$recipe.txt")"
  done
fi

# ---- 4. the step benchmark
stage "benchmarks/step.py aurora,muon,aurora-ema-ref,soap-muon" step.txt "$DEADLINE_S" "$PY" benchmarks/step.py \
  "${bench_size[@]}" --device "$device" --recipes aurora,muon,aurora-ema-ref,soap-muon
grep -E '^(device|recipe|aurora|muon|soap|bf16)' "$OUT/step.txt" | sed 's/^/    /' | tee -a "$SUMMARY"

note "gpu_check: $( [ "$failed" = 0 ] && echo "all stages passed" || echo "some stages FAILED" ) in $(( $(date +%s) - START ))s"
exit "$failed"

#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh [--setup] [--seeds N] [--recipes A,B,...] [train_gpt.py arguments...]
#   bash run.sh --ablate RECIPE --seeds N [--techniques A,B] [--plan] [train_gpt.py arguments...]
# Makes .venv (reusing the torch python3 imports, if any), installs what .venv cannot import, then:
#   with a GPU:    downloads the FineWeb shards the recipe needs and runs torchrun on every visible GPU;
#   without a GPU, or with --tiny: writes the synthetic shards (unless valid ones are there) and runs the
#   trainer's CPU preset (--tiny).
# --setup (alone) stops after installing; --seeds N runs N times with --seed 0..N-1 (so not with --seed, and
# not with --run-id, --save or --resume, which name one run); --recipes A,B runs every seed of each recipe
# (each recipe once) and then tabulates each recipe's runs with records/stats.py; --ablate RECIPE runs the recipe
# and each of its techniques left out over the seeds and prints the ablation table (records/ablate.py; --plan:
# the full-size cost only). Before any data is written or fetched, train_gpt.py --check-args refuses the
# arguments it would refuse; with --check-args every run is only checked (after the data is there), and nothing
# is tabulated. FLAG=VALUE is read as FLAG VALUE.
set -euo pipefail
cd "$(dirname "$0")"
# --ablate RECIPE: records/ablate.py runs each arm of the study through this script and prints the table.
if [[ " $* " == *" --ablate "* || " $* " == *" --ablate="* ]]; then
  [ -x .venv/bin/python ] || bash "$0" --setup
  exec .venv/bin/python records/ablate.py "$@"
fi

fail() { echo "run.sh: $*" >&2; exit 2; }
need_value() {  # EXAMPLE "$@": the flag in $1 must be followed by a value (not by the end or another flag)
  local example="$1"; shift
  if [ $# -lt 2 ] || [[ "$2" == --* ]]; then fail "$1 needs a value, e.g. $1 $example"; fi
}

others=()
for arg in "$@"; do [ "$arg" = --setup ] || others+=("$arg"); done
if [ ${#others[@]} -lt $# ] && [ ${#others[@]} -gt 0 ]; then
  fail "--setup only installs; leave out the other arguments (${others[*]})"
fi
setup_only=0
recipes=()       # --recipes A,B: each recipe in turn (every seed of one, then the next), tabulated at the end
recipe_given=0
tiny=0
seeds=1
seeds_given=0
args=()          # passed through to train_gpt.py
fetch_args=()    # the subset the shard downloader understands
one_run=()       # the flags that name a single run
check_only=0
while [ $# -gt 0 ]; do
  # The flags read here, spelt FLAG=VALUE, are split first (else --recipe=muon would slip past the checks).
  case "$1" in --seeds=*|--recipe=*|--recipes=*|--steps=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
  case "$1" in
    --setup) setup_only=1 ;;
    --seeds)
      need_value 20 "$@"
      [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "--seeds takes a whole number of runs (1 or more), got '$2'"
      seeds="$2"; seeds_given=1; shift ;;
    --recipe|--steps)
      if [ "$1" = --recipe ]; then need_value aurora "$@"; recipe_given=1; else need_value 500 "$@"; fi
      args+=("$1" "$2"); fetch_args+=("$1" "$2"); shift ;;
    --recipes)
      need_value aurora,soap-muon "$@"
      [[ "$2" =~ ^[a-z0-9-]+(,[a-z0-9-]+)*$ ]] || fail "--recipes takes recipe names separated by commas, got '$2'"
      IFS=, read -r -a recipes <<< "$2"
      repeated=$(printf '%s\n' "${recipes[@]}" | sort | uniq -d | head -n 1)
      [ -z "$repeated" ] || fail "--recipes names $repeated twice; give each recipe once"
      shift ;;
    --tiny) tiny=1 ;;
    --check-args) check_only=1; args+=("$1") ;;
    --seed|--seed=*|--run-id|--run-id=*|--save|--save=*|--resume|--resume=*) one_run+=("${1%%=*}"); args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ ${#recipes[@]} -gt 0 ] && [ "$recipe_given" = 1 ]; then
  fail "give --recipe NAME or --recipes A,B,..., not both"
fi
if [ ${#recipes[@]} -gt 0 ] && [ ${#one_run[@]} -gt 0 ]; then
  fail "${one_run[0]} names one run and --recipes makes one per recipe and seed; leave it out"
fi
for flag in "${one_run[@]}"; do
  if [ "$flag" = --seed ] && [ "$seeds_given" = 1 ]; then
    fail "--seeds $seeds runs seeds 0 to $((seeds - 1)); give --seeds or --seed, not both"
  fi
  if [ "$flag" != --seed ] && [ "$seeds" != 1 ]; then
    why="each run gets a log of its own"
    [ "$flag" = --save ] && why="each run would overwrite the checkpoint of the one before"
    [ "$flag" = --resume ] && why="a checkpoint continues the one run that saved it"
    fail "$flag names one run and --seeds $seeds makes $seeds; leave out $flag ($why)"
  fi
done

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

PY=.venv/bin/python
[ -x "$PY" ] || python3 -m venv .venv
# Install only the requirements .venv cannot import (a package imports under its name with '-' as
# '_', e.g. pytest-timeout as pytest_timeout): with everything present pip never runs, so no package
# index is contacted.
missing_requirements() {
  "$PY" - requirements-test.txt <<'EOF'
import importlib, os, re, sys

def requirements(path):
    for line in open(path):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            yield from requirements(os.path.join(os.path.dirname(path), line[3:].strip()))
        elif line:
            yield line

for spec in requirements(sys.argv[1]):
    name = re.match(r"[A-Za-z0-9_.-]+", spec)[0]
    try:
        importlib.import_module(name.replace("-", "_"))
    except Exception:  # ImportError, or a broken build (an OSError from its libraries, say)
        # torch pinned so that pip takes the CPU build where one lies on disk, not a multi-GB CUDA build.
        print("torch==2.13.0" if name == "torch" else spec)
EOF
}
missing=$(missing_requirements)
# Reuse a working torch: when .venv cannot import torch but python3 can (any build; python3 may itself
# be a virtualenv holding the machine's CUDA torch, which `venv --system-site-packages` would not see),
# .venv gets python3's site directories behind its own through a .pth file, so torch is never installed
# twice.
if grep -qx "torch==2.13.0" <<< "$missing" && python3 -c "import torch" >/dev/null 2>&1; then
  python3 -c 'import site
dirs = ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []) + site.getsitepackages()
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))' \
    > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/python3-site-packages.pth"
  echo "run.sh: .venv uses the torch of python3 ($(command -v python3)): $("$PY" -c 'import torch; print(torch.__version__)')"
  missing=$(missing_requirements)
fi
# Training needs the rest; matplotlib only plots (records/stats.py --plot) and the lines of
# requirements-test.txt itself only test and analyse. Offline, or with no index that has them, setup
# says so and goes on.
optional=" matplotlib $(sed -e 's/#.*//' -e '/^-r /d' requirements-test.txt | tr -s ' \n' ' ') "
required=() wanted=()
for spec in $missing; do
  if [[ "$optional" == *" $spec "* ]]; then wanted+=("$spec"); else required+=("$spec"); fi
done
if [ ${#required[@]} -gt 0 ]; then
  echo "run.sh: installing into .venv: ${required[*]}"
  "$PY" -m pip install -q "${required[@]}"
fi
if [ ${#wanted[@]} -gt 0 ]; then
  echo "run.sh: installing into .venv (optional: plots, tests): ${wanted[*]}"
  if ! "$PY" -m pip install -q "${wanted[@]}" >/dev/null 2>&1; then
    echo "run.sh: could not install ${wanted[*]} (no package index reachable?); training does not need them." \
         "Add them later with: $PY -m pip install ${wanted[*]}"
  fi
fi
[ "$setup_only" = 1 ] && exit 0

# train_gpt.py checks the arguments itself (recipe, numbers, checkpoints, --save) before any data is
# written or fetched; it prints its one error line and exits 2 if it would refuse the run.
preset=()
if [ "$has_gpu" = 1 ] && [ "$tiny" = 0 ]; then launch=("$PY" -m torch.distributed.run --standalone
                                                          --nproc_per_node="$(nvidia-smi -L | wc -l)")
else preset=(--tiny); launch=("$PY"); fi
# One pass per recipe of --recipes (its runs named batch-recipe-seedS, so the table finds them), or one
# pass with the arguments as given.
per_recipe=()
for r in "${recipes[@]}"; do per_recipe+=("--recipe $r"); done
[ ${#per_recipe[@]} -gt 0 ] || per_recipe=("")
for choice in "${per_recipe[@]}"; do
  read -r -a chosen <<< "$choice"
  "$PY" train_gpt.py --check-args "${preset[@]}" "${chosen[@]}" "${args[@]}" || exit $?
done

if [ ${#preset[@]} -eq 0 ]; then
  for choice in "${per_recipe[@]}"; do
    read -r -a chosen <<< "$choice"
    "$PY" data/cached_fineweb10B.py "${chosen[@]}" "${fetch_args[@]}"
  done
# The synthetic shards are deterministic: valid ones, enough for the preset, are kept.
elif "$PY" data/shards.py --tiny >/dev/null 2>&1; then
  echo "run.sh: data/synthetic/ holds valid shards for the CPU preset: kept"
else
  "$PY" data/synthetic.py
fi
batch="run-$(date +%Y%m%d-%H%M%S)"
for choice in "${per_recipe[@]}"; do
  read -r -a chosen <<< "$choice"
  for ((s = 0; s < seeds; s++)); do
    named=()
    [ ${#recipes[@]} -gt 0 ] && named=(--run-id "$batch-${chosen[1]}-seed$s")
    "${launch[@]}" train_gpt.py "${preset[@]}" --seed "$s" "${chosen[@]}" "${named[@]}" "${args[@]}"
  done
done
if [ "$check_only" = 1 ]; then
  [ ${#recipes[@]} -eq 0 ] || echo "run.sh: --check-args: the runs were only checked, so there is nothing to tabulate"
  exit 0
fi
status=0
for r in "${recipes[@]}"; do
  "$PY" records/stats.py --label "$r" logs/"$batch-$r"-seed*.txt || status=$?
done
exit $status

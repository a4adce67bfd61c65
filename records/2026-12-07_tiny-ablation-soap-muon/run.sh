#!/usr/bin/env bash
# The study's runs, from anywhere (README.md):
#     nohup bash records/2026-12-07_tiny-ablation-soap-muon/run.sh > /dev/null 2>&1 &
# bash run.sh --ablate runs the 54 runs seed by seed into logs/ (their console into ablate.txt here) and prints
# the table; the logs then move here. Run again after an interruption: the complete logs are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=records/2026-12-07_tiny-ablation-soap-muon
flags=(--tiny --no-diagnostics)
bash run.sh --ablate soap-muon --seeds 3 "${flags[@]}" >> "$out/ablate.txt" 2>&1
tag=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "records"); import ablate; print(ablate.study_tag(sys.argv[1:]))' \
      "${flags[@]}")
mv logs/ablate-soap-muon-"$tag"-*.txt "$out"/

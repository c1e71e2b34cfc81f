#!/usr/bin/env bash
# The GPU tables on one CUDA GPU, in at most 8 minutes, with no network access:
#   bash benchmarks/gpu/run.sh            # writes results/speedup/cuda-<gpu name>/
#   bash benchmarks/gpu/run.sh --dry-run  # prints the plan and checks imports (any machine)
# Then, without training, every saved model of the committed quick-suite and evidence results is
# re-timed on the GPU (`sparsebench retime DIR --device cuda`): each record gains a
# "cuda: <GPU name>" latency entry, shown as its own table by `sparsebench leaderboard DIR`.
# Directories without saved models (OUT/models/) are named and skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
timeout 480 python benchmarks/gpu/gpu_tables.py "$@"
if [[ " $* " == *" --dry-run "* ]]; then
    echo "retime: would re-time the saved models of results/quick and results/evidence on cuda"
    exit 0
fi
for dir in results/quick results/evidence; do
    if [[ -d "$dir/models" ]]; then
        timeout 300 python -m sparsebench retime "$dir" --device cuda --quiet
        python -m sparsebench leaderboard "$dir" --output "$dir/leaderboard.md"
    else
        echo "retime: $dir has no saved models (re-run its suite to save them); skipped"
    fi
done

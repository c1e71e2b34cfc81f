#!/usr/bin/env bash
# The GPU tables on one CUDA GPU, in at most 8 minutes, with no network access:
#   bash benchmarks/gpu/run.sh            # writes results/speedup/cuda-<gpu name>/
#   bash benchmarks/gpu/run.sh --dry-run  # prints the plan and checks imports (any machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
exec timeout 480 python benchmarks/gpu/gpu_tables.py "$@"

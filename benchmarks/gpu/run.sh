#!/usr/bin/env bash
# The GPU tables on one CUDA GPU, in at most 8 minutes, with no network access:
#   bash benchmarks/gpu/run.sh            # writes results/speedup/cuda-<gpu name>/
#   bash benchmarks/gpu/run.sh --dry-run  # the same plan on the CPU at stand-in size, under its own caps
# Step 1 (gpu_tables.py) times every cell within its part's cap and writes each part's table as each
# cell finishes. Step 2 always runs, whatever step 1 did (a failure, its time limit): without training,
# every saved model of the committed quick-suite and evidence results is re-timed on the GPU
# (`sparsebench retime DIR --device cuda --max-seconds S`): each record gains a "cuda: <GPU name>"
# latency entry, shown as its own table by `sparsebench leaderboard DIR`. Directories without saved
# models (OUT/models/) are named and skipped. The dry run re-times a copy of those records on the CPU.
# Arguments go to gpu_tables.py (--out DIR, --parts ..., --cap PART=SECONDS). Limits, in seconds, from
# the environment: GPU_SCRIPT_S (the whole script, 470), TABLES_S (step 1, 320), RETIME_S (each
# re-timing, 50), LEADERBOARD_S (each leaderboard, 25). Exit status: the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
SCRIPT_S=${GPU_SCRIPT_S:-470}
TABLES_S=${TABLES_S:-320}
RETIME_S=${RETIME_S:-50}
LEADERBOARD_S=${LEADERBOARD_S:-25}
START_TOOL_S=15                  # a python start with torch imported, and one timing's overrun

dry=0 out="" prev=""
for arg in "$@"; do
    [[ $arg == --dry-run ]] && dry=1
    [[ $prev == --out ]] && out=$arg
    prev=$arg
done
args=("$@")
if [[ $dry == 1 && -z $out ]]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/gpu-tables-dry.XXXXXX")
    args+=(--out "$out")
fi
device=cuda; [[ $dry == 1 ]] && device=cpu
left() { echo $(( SCRIPT_S - SECONDS )); }
min() { echo $(( $1 < $2 ? $1 : $2 )); }
status=0
note() { local code=$1; shift; echo "$*"; [[ $status == 0 && $code != 0 ]] && status=$code; return 0; }

dirs=()
for src in results/quick results/evidence; do
    if [[ -d $src/models ]]; then dirs+=("$src")
    else echo "retime: $src has no saved models (re-run its suite to save them); skipped"; fi
done
reserve=$(( ${#dirs[@]} * (RETIME_S + LEADERBOARD_S) ))     # step 2's share of the script's limit
limit=$(min "$TABLES_S" $(( $(left) - reserve )))
if (( limit > 0 )); then
    timeout --kill-after=10 "$limit" python benchmarks/gpu/gpu_tables.py "${args[@]}"
    code=$?
    [[ $code != 0 ]] && note "$code" "gpu tables: exit $code$([[ $code == 124 || $code == 137 ]] && echo " (stopped at its ${limit} s limit)"); every cell finished before it is on disk; re-timing runs anyway"
else
    note 124 "gpu tables: not started: re-timing ${#dirs[@]} directories needs ${reserve} s of the script's ${SCRIPT_S} s; re-timing runs"
fi

for i in "${!dirs[@]}"; do
    src=${dirs[$i]}
    dir=$src
    if [[ $dry == 1 ]]; then                  # the committed records stay as they are: a copy is re-timed
        dir=$out/retime/$(basename "$src")
        mkdir -p "$dir/records" "$dir/models"
        for model in "$src"/models/*.safetensors; do
            id=$(basename "$model" .safetensors)
            [[ -f $src/records/$id.json ]] && cp "$model" "$dir/models/" && cp "$src/records/$id.json" "$dir/records/"
        done
    fi
    after=$(( ${#dirs[@]} - i - 1 ))
    limit=$(min "$RETIME_S" $(( $(left) - LEADERBOARD_S - after * (RETIME_S + LEADERBOARD_S) )))
    budget=$(( limit - START_TOOL_S ))
    if (( budget < 5 )); then
        note 124 "retime: $src skipped, ${limit} s left of the script's ${SCRIPT_S} s"
        continue
    fi
    timeout --kill-after=5 "$limit" python -m sparsebench retime "$dir" --device "$device" --max-seconds "$budget" --quiet
    code=$?
    [[ $code != 0 ]] && note "$code" "retime: $dir exit $code"
    limit=$(min "$LEADERBOARD_S" "$(left)")
    if (( limit < 1 )); then
        note 124 "leaderboard: $dir skipped, no time left of the script's ${SCRIPT_S} s"
        continue
    fi
    timeout --kill-after=5 "$limit" python -m sparsebench leaderboard "$dir" --output "$dir/leaderboard.md"
    code=$?
    [[ $code != 0 ]] && note "$code" "leaderboard: $dir exit $code"
done
echo "run.sh: ${SECONDS} s of ${SCRIPT_S} s$([[ $dry == 1 ]] && echo "; dry run written under $out")"
exit $status

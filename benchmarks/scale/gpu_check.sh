#!/usr/bin/env bash
# Device check for the scale-out work (one GPU): the Ray launcher with --device cuda (num_gpus=1 per
# run), a plain cuda run through the torchrun entry, the scale tests, and uncontended overhead figures.
# Usage: OUT=dir bash benchmarks/scale/gpu_check.sh
set -u
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi -L; nproc
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python -c "import ray; print('ray', ray.__version__)" || { echo "no ray here"; }
cat > "$OUT/tiny.yaml" <<'Y'
name: tiny
methods: [dense, magnitude-global]
models: [resnet20_tiny]
datasets: [digits]
targets: {sparsity: [0.5]}
seeds: [0, 1]
recipe: {pretrain_epochs: 0.3, finetune_epochs: 0.2, search_epochs: 0.2}
data: {img_size: 16}
measure: {latency: false}
Y
echo "== ray launcher, cuda"; /usr/bin/time -f "%e s" timeout 240 python -m sparsebench sweep "$OUT/tiny.yaml" \
  --out "$OUT/ray" --launcher ray --jobs 4 --device cuda --quiet 2>&1 | grep -v "WARN\|INFO" | tail -6
python - "$OUT/ray" <<'P'
import sys; from sparsebench.store import load_records
rs = load_records(sys.argv[1]); print([(r.method, r.seed, r.status, r.environment.get("device")) for r in rs])
P
echo "== torchrun entry, 1 process, cuda"; timeout 120 torchrun --nproc_per_node 1 -m sparsebench run --method magnitude-global \
  --model resnet20_tiny --dataset digits --target sparsity=0.5 --img-size 16 --recipe pretrain_epochs=0.3 \
  --recipe finetune_epochs=0.2 --no-latency --quiet --device cuda --out "$OUT/tr" 2>&1 | tail -2
echo "== tests"; timeout 200 python -m pytest -q -p no:cacheprovider tests/test_platform.py tests/runners/test_launchers.py \
  tests/runners/test_ddp.py 2>&1 | tail -3
echo "== overheads (uncontended)"; timeout 150 python benchmarks/scale/overhead.py launchers 2>&1 | grep -v "WARN\|INFO" | tail -6
timeout 100 python benchmarks/scale/overhead.py ddp 2>&1 | grep -v Warn | tail -2

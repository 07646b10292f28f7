#!/usr/bin/env bash
# Issue 13's GPU measurements in one run, for a machine with one CUDA GPU and no internet: the benchmark of every
# method with eager and compiled steps (s/step, TFLOP/s, share of the measured matrix peak, peak memory, operations
# and full-resolution bytes per step), then a torch.profiler table and Chrome trace per model (scripts/profile_step.py).
# Usage: bash scripts/gpu_check.sh [WHEEL_DIR]   (WHEEL_DIR: wheels of monai, pytorch-ignite, nibabel, fire, tqdm,
# pytorch-optimizer and their dependencies, for a machine that lacks them; torch with CUDA must be installed already)
# Environment knobs: PY (python, default python3), OUT (default runs/gpu_check), REPEATS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_check}
REPEATS=${REPEATS:-10}
if [ -n "${1:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$1" monai pytorch-ignite nibabel fire tqdm pytorch-optimizer
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures a GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "== benchmark: uniseg, meduniseg, hermes at the catalogs' patches, eager and compiled ($REPEATS repeats)"
"$PY" -m uniseg_components benchmark --model uniseg,meduniseg,hermes --compile True --repeats "$REPEATS" \
    | tee "$OUT/benchmark.md"
echo "== profiler: one training step per model (tables below, Chrome traces in $OUT)"
"$PY" scripts/profile_step.py --out "$OUT" | tee "$OUT/profile.md"
echo "done: $OUT/benchmark.md, $OUT/profile.md and the traces; record the figures in docs/benchmarks.md"

#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the package with the given extras.
# Sourced by quickstart.sh and test.sh:  source scripts/setup_env.sh "demo"   -> sets $PY.
# TORCH_SPEC picks the PyTorch build: the default torch==2.13.0 is the CPU wheel on the project's machines;
# on a GPU machine set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126" first.
set -euo pipefail
EXTRAS=${1:-}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "installing ${TORCH_SPEC:=torch==2.13.0}"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $TORCH_SPEC
fi
echo "installing uniseg_components${EXTRAS:+[$EXTRAS]}"
"$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
"$PY" -c "import uniseg_components, torch, monai; print('uniseg_components', uniseg_components.__version__, '| torch', torch.__version__, '| monai', monai.__version__, '| cuda', torch.cuda.is_available())"
# glibc returns large freed tensors to the system after every step and pays page faults to get them back; keeping
# them cut a CPU training step of the demo plan from 0.35 s to 0.29 s here (docs/benchmarks.md).
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824

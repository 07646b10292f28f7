#!/usr/bin/env bash
# Release zips in a real MONAI Label 0.8.5 server on loopback, offline: /info/, /infer/ on a demo image, /train/ for
# one epoch, /infer/ with the trained weights (see scripts/check_monailabel.py for what is checked).
#
#   bash scripts/check_monailabel.sh BUNDLE_ZIP [BUNDLE_ZIP ...]
#
# MONAI Label gets its own virtual environment (VENV_MONAILABEL, default .venv-monailabel; created when missing):
# monailabel==0.8.5 with the torch and torchvision pip picks for it (a matching pair: MONAI Label imports torchvision
# at start-up, and a CPU-only torch beside the index's torchvision fails there; with the CUDA build of torch the
# environment takes about 8 GB) and pydicom 2 (pydicom 3 breaks the import of pydicom-seg 0.4.1, MONAILabel issue
# #1841, and the server exits at start-up; pynetdicom and dicomweb-client are pinned to releases that accept it).
# No model-zoo download (the bundle is a local folder of the app, zoo_source github), no SAM2 (sam2 false).
# The project's own environment (.venv, scripts/setup_env.sh) writes the demo studies and checks the answers.
# Environment: VENV_MONAILABEL, PORT (default 8765), WORK (scratch folder, kept; default a temporary one per bundle,
# removed after it passed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: $0 BUNDLE_ZIP [BUNDLE_ZIP ...]" >&2
    exit 2
fi
source scripts/setup_env.sh demo
ML_VENV=${VENV_MONAILABEL:-.venv-monailabel}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$ML_VENV/bin/monailabel" ]; then
    echo "creating MONAI Label's virtual environment $ML_VENV"
    t0=$SECONDS
    python3 -m venv "$ML_VENV"
    "$ML_VENV/bin/pip" install -q monailabel==0.8.5 "pydicom<3" "pynetdicom<3" "dicomweb-client<0.60"
    echo "installed in $(( SECONDS - t0 )) s"
fi
# the Hermes bundle's optimiser (LAMB) for MONAI Label's /train/; a pure-Python wheel, nothing to do when present
"$ML_VENV/bin/pip" install -q "pytorch-optimizer==4.1.0"
"$ML_VENV/bin/python" -c "import monailabel, monai, torch, torchvision; print('monailabel', monailabel.__version__, '| monai', \
    monai.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
WORK_ARG=()
if [ -n "${WORK:-}" ]; then
    mkdir -p "$WORK"
    WORK_ARG=(--work "$WORK")
fi
"$PY" scripts/check_monailabel.py --monailabel "$ML_VENV/bin/monailabel" --port "${PORT:-8765}" "${WORK_ARG[@]}" "$@"

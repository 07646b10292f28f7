#!/usr/bin/env bash
# Sets up the virtual environment with the test extras and runs the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
"$PY" -m pytest -q --durations=15 "$@"

#!/usr/bin/env bash
# The MONAI model zoo's own checks on release zips, offline.
#
#   bash scripts/check_zoo.sh ZOO_DIR SCHEMA BUNDLE_ZIP [BUNDLE_ZIP ...]
#
# ZOO_DIR is a checkout of github.com/Project-MONAI/model-zoo, SCHEMA a local copy of the metadata schema the zoo's
# CI downloads (meta_schema_20240725.json). For each zip, as the zoo's CI does for a pull request:
#   1. a virtual environment with what the zoo installs for the bundle: the pins its own ci/get_bundle_requirements.py
#      reads from metadata.json (monai, torch, numpy and required_packages_version versions), and jsonschema;
#   2. the bundle unzipped into models/<name> of a copy of the zoo's ci/, its schema in eval/schema.json;
#   3. ci/verify_bundle.py -m min (the CPU pre-merge) and -m full (shape check, TorchScript export);
#   4. the zoo's flake8, black and isort settings (setup.cfg, pyproject.toml) on the bundle's scripts/;
#   5. every pinned version has a wheel for Python 3.10, 3.11 and 3.12 on the package index (pip index versions).
# Environment: WORK (scratch folder, kept; default a new temporary one, removed when every check passed), PYTHON (default python3), TORCH_SPEC (what to
# install for torch first, default torch==<pytorch_version>: the CPU wheel on the project's machines).
# Exits non-zero at the first failing check; prints one line per check and bundle with its time.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 ZOO_DIR SCHEMA BUNDLE_ZIP [BUNDLE_ZIP ...]" >&2
    exit 2
fi
ZOO=$(realpath "$1")
SCHEMA=$(realpath "$2")
shift 2
[ -f "$ZOO/ci/verify_bundle.py" ] || { echo "$ZOO is not a model-zoo checkout (no ci/verify_bundle.py)" >&2; exit 2; }
[ -f "$SCHEMA" ] || { echo "schema $SCHEMA not found" >&2; exit 2; }
if [ -z "${WORK:-}" ]; then
    # our own scratch folder (a venv and the zoo's ci/: about 3 GB): removed after a pass, kept after a failure
    WORK=$(mktemp -d)
    trap 'rc=$?; if [ $rc -eq 0 ]; then rm -rf "$WORK"; else echo "scratch folder kept for inspection: $WORK" >&2; fi' EXIT
fi
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
VENV="$WORK/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { local t0=$SECONDS; "$@"; echo "  ok  $(( SECONDS - t0 )) s"; }

if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q jsonschema pyyaml flake8 flake8-bugbear flake8-comprehensions flake8-executable pep8-naming \
    black isort

for zip in "$@"; do
    zip=$(realpath "$zip")
    name=$(basename "$zip")
    name=${name%_v*.zip}
    echo "== $name ($(basename "$zip"), sha1 $(sha1sum "$zip" | cut -d' ' -f1))"
    zoo="$WORK/zoo_$name"
    rm -rf "$zoo"
    mkdir -p "$zoo/models"
    cp -r "$ZOO/ci" "$ZOO/setup.cfg" "$ZOO/pyproject.toml" "$zoo/"
    cp "$ZOO/models/model_info.json" "$zoo/models/"
    (cd "$zoo/models" && unzip -q "$zip")
    [ -d "$zoo/models/$name" ] || { echo "$zip has no top folder $name/" >&2; exit 1; }
    mkdir -p "$zoo/models/$name/eval"
    cp "$SCHEMA" "$zoo/models/$name/eval/schema.json"
    cd "$zoo"

    echo "-- requirements (ci/get_bundle_requirements.py)"
    pins=$("$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print(m['pytorch_version'], m['monai_version'])" \
        "models/$name/configs/metadata.json")
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        "$PY" -m pip install -q ${TORCH_SPEC:-torch==${pins% *}}
    fi
    "$PY" -m pip install -q "monai==${pins#* }"  # the zoo's ci/utils.py imports monai
    reqfile=$(cd "$zoo" && PYTHONPATH="$zoo/ci" "$PY" ci/get_bundle_requirements.py -b "$name" -p models)
    cat "$reqfile"
    step "$PY" -m pip install -q -r "$reqfile"

    echo "-- wheels for Python 3.10, 3.11, 3.12"
    while read -r line; do
        pkg=${line%%==*}
        ver=${line#*==}
        for py in 3.10 3.11 3.12; do
            avail=$("$PY" -m pip index versions "$pkg" --python-version "$py" --only-binary=:all: 2>/dev/null \
                | sed -n 's/^Available versions: //p')
            if ! tr -d ' ' <<<",$avail," | grep -q ",$ver,"; then
                echo "$pkg==$ver has no wheel for Python $py on the package index" >&2
                exit 1
            fi
        done
        echo "  $pkg==$ver: 3.10 3.11 3.12"
    done < "$reqfile"

    echo "-- ci/verify_bundle.py -m min"
    step "$PY" ci/verify_bundle.py -b "$name" -p models -m min
    echo "-- ci/verify_bundle.py -m full"
    step "$PY" ci/verify_bundle.py -b "$name" -p models -m full
    rm -f "models/$name/models/verify_model.ts"

    echo "-- lint of models/$name/scripts (flake8, black, isort with the zoo's settings)"
    step "$PY" -m flake8 --config setup.cfg "models/$name/scripts"
    step "$PY" -m black --config pyproject.toml --check -q "models/$name/scripts"
    step "$PY" -m isort --settings-path setup.cfg --check-only -q "models/$name/scripts"
    cd - >/dev/null
    echo "== $name passes the model zoo's checks"
done

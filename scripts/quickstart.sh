#!/usr/bin/env bash
# The main job on the embedded demo data, from a fresh clone: set up the virtual environment, then with the
# upstream MONAI bundle (bundles/uniseg_universal_segmentation) train UniSeg jointly on the demo's 3D tasks (the
# demo data is written on first use; small "cpu demo" plan), evaluate it on the held-out cases (Dice per task and
# class), and segment a held-out CT image for all tasks of its modality.
# Environment knobs: WORK (output folder, default runs/quickstart), EPOCHS, BATCHES_PER_TASK, VENV, TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh demo
WORK=${WORK:-runs/quickstart}
EPOCHS=${EPOCHS:-30}
BATCHES_PER_TASK=${BATCHES_PER_TASK:-12}
B=bundles/uniseg_universal_segmentation
mkdir -p "$WORK"

echo "== 1/3 train UniSeg with $B ($EPOCHS epochs x $BATCHES_PER_TASK batches per task; outputs in $WORK)"
"$PY" -m monai.bundle run training --config_file "$B/configs/train.json" --bundle_root "$WORK" \
    --epochs "$EPOCHS" --batches_per_task "$BATCHES_PER_TASK" --val_interval "$EPOCHS"
echo "== 2/3 evaluate the final weights on the held-out cases (Gaussian window, overlap 0.5, mirroring: the papers' protocol)"
"$PY" -m monai.bundle run --config_file "['$B/configs/train.json','$B/configs/evaluate.json']" --bundle_root "$WORK"
"$PY" -m uniseg_components evaluate "$WORK/models" "$WORK/demo_data/datalist.json" \
    --output "$WORK/eval/evaluation_original_grid.json" --pictures "$WORK/eval/pictures"
echo "== 3/3 segment a held-out CT image for all CT tasks"
IMAGE=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(next(i['image'] for i in d['validation'] if i['task']=='abdomen_ct'))" "$WORK/demo_data/datalist.json")
"$PY" -m monai.bundle run --config_file "$B/configs/inference.json" --bundle_root "$WORK" --task all --modality CT \
    --datalist "$IMAGE"
echo "done: model $WORK/models/model.pt, Dice tables above and in $WORK/eval/, label maps in $WORK/eval/," \
    "quick-look pictures in $WORK/eval/pictures/"

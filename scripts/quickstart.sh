#!/usr/bin/env bash
# The main job on the embedded demo data, from a fresh clone: set up the virtual environment, write the demo
# collection, validate it into a datalist, train UniSeg jointly on its 3D tasks (small "cpu demo" plan),
# evaluate on the held-out cases (per-task Dice against an all-background prediction) and segment a held-out
# image for all tasks of its modality.
# Environment knobs: WORK (output folder, default runs/quickstart), EPOCHS, BATCHES_PER_TASK, VENV, TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh demo
WORK=${WORK:-runs/quickstart}
EPOCHS=${EPOCHS:-30}
BATCHES_PER_TASK=${BATCHES_PER_TASK:-12}
CLI=("$PY" -m uniseg_components)

echo "== 1/5 demo data"
"${CLI[@]}" demo-data --out "$WORK/demo_data"
echo "== 2/5 prepare"
"${CLI[@]}" prepare "$WORK/demo_data" --out "$WORK/prepared"
echo "== 3/5 train UniSeg ($EPOCHS epochs x $BATCHES_PER_TASK batches per task)"
"${CLI[@]}" train "$WORK/prepared/datalist.json" --output_dir "$WORK/model" --epochs "$EPOCHS" \
    --batches_per_task "$BATCHES_PER_TASK" --val_interval "$EPOCHS"
echo "== 4/5 evaluate on held-out cases"
"${CLI[@]}" evaluate "$WORK/model/model.pt" "$WORK/prepared/datalist.json" --output "$WORK/evaluation.json"
echo "== 5/5 infer all CT tasks on a held-out image"
IMAGE=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(next(i['image'] for i in d['validation'] if i['task']=='abdomen_ct'))" "$WORK/prepared/datalist.json")
"${CLI[@]}" infer "$WORK/model/model.pt" "$IMAGE" --task all --modality CT --out "$WORK/predictions"
echo "done: model $WORK/model/model.pt, Dice table above and in $WORK/evaluation.json, label maps in $WORK/predictions"

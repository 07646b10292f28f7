"""End-to-end: demo data -> prepare -> train -> evaluate -> infer, through the Python API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import outline_pixels

from uniseg_components import cli
from uniseg_components.checkpoints import load_checkpoint
from uniseg_components.demo import write_demo_collection
from uniseg_components.tasks import UnknownTaskError
from uniseg_components.workflows import evaluate as evaluate_checkpoint
from uniseg_components.workflows import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A UniSeg trained briefly on two demo tasks (brain MR tissues, PET/CT lesions) plus the 2D task's data."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("workflow")
    demo = write_demo_collection(
        root / "demo",
        tasks=["brain_mr", "lesion_petct", "fetal_us"],
        num_cases={"brain_mr": 5, "lesion_petct": 5, "fetal_us": 3},
    )
    datalist = cli.prepare(str(demo), out=str(root / "prepared"))
    res = train(
        datalist,
        output_dir=root / "model",
        epochs=4,
        batches_per_task=10,
        val_interval=2,
        augment=False,
        seed=0,
        config={"image_log_interval": 2},
    )
    return {"root": root, "datalist": datalist, "result": res, "demo": demo}


def test_training_writes_checkpoints_and_validates(trained):
    res, root = trained["result"], trained["root"]
    assert Path(res["checkpoint"]) == root / "model" / "model.pt"
    assert (root / "model" / "model_final.pt").is_file()
    assert res["best_epoch"] in (2, 4)
    # the 2D task was left out (UniSeg is 3D), the others validated
    assert set(res["details"]) == {"brain_mr", "lesion_petct"}
    obj = torch.load(res["checkpoint"], weights_only=True)
    assert obj["meta"]["network"]["name"] == "UniSeg"
    assert [t["name"] for t in obj["meta"]["catalog"]["tasks"]] == ["brain_mr", "lesion_petct"]


def test_trained_model_beats_all_background_on_held_out_cases(trained):
    res = evaluate_checkpoint(trained["result"]["checkpoint"], trained["datalist"])
    assert res["cases"] == 2
    assert res["mean"] > res["baseline_mean"] + 0.2
    values = [v for classes in res["per_task"].values() for v in classes.values()]
    assert res["mean_over_classes"] == pytest.approx(sum(values) / len(values))  # brain_mr's 3 classes weigh 3x
    brain = res["per_task"]["brain_mr"]
    assert brain["grey matter"] > 0.4 and brain["white matter"] > 0.4
    assert "all-bg" in res["table"] and "brain_mr" in res["table"]


def test_validation_logs_per_task_dice_curves_and_images_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    for f in (trained["root"] / "model" / "eval").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars.update({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
        images.update({t: [(e.step, e.encoded_image_string) for e in acc.Images(t)] for t in acc.Tags()["images"]})
    details = trained["result"]["details"]  # the last validation (epoch 4)
    for task in ("brain_mr", "lesion_petct"):
        curve = scalars[f"val_mean_dice/{task}"]
        assert [step for step, _ in curve] == [2, 4]  # validated every 2 epochs
        assert curve[-1][1] == pytest.approx(sum(details[task].values()) / len(details[task]), abs=1e-5)
    # MONAI's TensorBoardImageHandler: image, label and prediction of a validation case, 8 slices as GIF frames
    from io import BytesIO

    from PIL import Image

    for tag in ("input_0_HWD/image", "input_1_HWD/image", "output_HWD/image"):
        assert [step for step, _ in images[tag]] == [2, 4]
        for _, gif in images[tag]:
            assert Image.open(BytesIO(gif)).n_frames == 8


def test_evaluate_cli_draws_a_quicklook_per_task(trained, tmp_path):
    from matplotlib.image import imread

    cli.evaluate(trained["result"]["checkpoint"], trained["datalist"], pictures=str(tmp_path / "pics"))

    for task in ("brain_mr", "lesion_petct"):
        png = imread(tmp_path / "pics" / f"{task}.png")
        assert png.ndim == 3 and png.shape[0] > 200
        assert outline_pixels(png, (1.0, 0.0, 0.0))[0] > 20, f"{task}: no ground-truth outline of class 1"
    # the model finds grey matter (class 2, green; Dice > 0.4 above): its outline is in the prediction column too
    assert min(outline_pixels(imread(tmp_path / "pics" / "brain_mr.png"), (0.0, 1.0, 0.0))) > 20


def test_infer_single_task_writes_label_map_on_input_grid(trained, tmp_path):
    val = json.loads(Path(trained["datalist"]).read_text())["validation"]
    item = next(it for it in val if it["task"] == "brain_mr")
    out = cli.infer(trained["result"]["checkpoint"], item["image"], task="brain_mr", out=str(tmp_path))
    assert len(out) == 1 and out[0].endswith("_brain_mr.nii.gz")
    pred, img = nib.load(out[0]), nib.load(item["image"])
    assert pred.shape == img.shape[:3]
    np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
    values = set(np.unique(np.asarray(pred.dataobj)).tolist())
    assert values <= {0, 1, 2, 3} and len(values) >= 3
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file may be left behind"


def test_infer_all_tasks_merges_with_offsets(trained, tmp_path):
    val = json.loads(Path(trained["datalist"]).read_text())["validation"]
    item = next(it for it in val if it["task"] == "lesion_petct")
    # two channels fit only the CT+PET combination: no --modality needed
    out = cli.infer(trained["result"]["checkpoint"], item["image"], task="all", out=str(tmp_path))
    pred = np.asarray(nib.load(out[0]).dataobj)
    _, cat = load_checkpoint(trained["result"]["checkpoint"])
    offset = cat["lesion_petct"].label_offset
    assert set(np.unique(pred).tolist()) <= {0, offset + 1}
    # one channel fits the brain task only in this catalog; the T1 image gets the brain offsets
    brain = next(it for it in val if it["task"] == "brain_mr")
    out = cli.infer(trained["result"]["checkpoint"], brain["image"], task="all", out=str(tmp_path))
    vals = set(np.unique(np.asarray(nib.load(out[0]).dataobj)).tolist())
    assert vals <= {0, 1, 2, 3}


def test_infer_bad_inputs_name_the_problem(trained, tmp_path):
    ckpt = trained["result"]["checkpoint"]
    val = json.loads(Path(trained["datalist"]).read_text())["validation"]
    brain = next(it for it in val if it["task"] == "brain_mr")
    with pytest.raises(UnknownTaskError, match="liver"):
        cli.infer(ckpt, brain["image"], task="liver", out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        cli.infer(ckpt, str(tmp_path / "missing.nii.gz"), task="brain_mr", out=str(tmp_path))
    with pytest.raises(ValueError, match="no task .* takes modalities"):
        cli.infer(ckpt, brain["image"], task="all", modality="US", out=str(tmp_path))
    # a 2-channel PET/CT image given to the 1-channel brain task: the error names the file and the task
    petct = next(it for it in val if it["task"] == "lesion_petct")
    with pytest.raises(Exception, match="brain_mr") as err:
        cli.infer(ckpt, petct["image"], task="brain_mr", out=str(tmp_path))
    assert "channel" in str(err.value) or "channel" in str(err.value.__cause__)
    # a truncated checkpoint
    bad = tmp_path / "bad.pt"
    bad.write_bytes(Path(ckpt).read_bytes()[:1000])
    with pytest.raises(ValueError, match="bad.pt"):
        cli.infer(str(bad), brain["image"], task="brain_mr", out=str(tmp_path))
    assert not list(tmp_path.glob("*.nii.gz")), "a failed run must not write outputs"


def test_prepare_cli_without_catalog_plans_and_names_a_bad_dataset_json(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"ds/dataset.json' has no 'labels'"):
        cli.prepare(str(tmp_path / "ds"), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli.prepare(str(tmp_path / "nowhere"), catalog="demo", out=str(tmp_path / "out"))


@pytest.mark.parametrize("verb", ["demo-data", "plan", "prepare", "train", "evaluate", "compare", "infer", "benchmark"])
def test_cli_help(verb):
    proc = subprocess.run(
        [sys.executable, "-m", "uniseg_components", verb, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "Args" in text or "FLAGS" in text
    doc = cli.COMMANDS[verb].__doc__.split("\n")[0]
    assert doc.split()[0] in text


def test_prepare_cli_maps_renamed_folders_to_tasks(tmp_path):
    demo = write_demo_collection(tmp_path / "demo", tasks=["fetal_us"], num_cases=3)
    renamed = tmp_path / "Task99_Ultrasound"
    (demo / "Demo04_FetalUS2D").rename(renamed)
    with pytest.raises(ValueError, match="Task99_Ultrasound"):  # no catalog task has that dataset name
        cli.prepare(str(renamed), catalog="demo", out=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "datalist.json").exists()
    path = cli.prepare(str(renamed), catalog="demo", out=str(tmp_path / "out"), tasks="Task99_Ultrasound=fetal_us")
    d = json.loads(Path(path).read_text())
    assert {it["task"] for it in d["training"] + d["validation"]} == {"fetal_us"}
    assert len(d["training"]) + len(d["validation"]) == 3
    with pytest.raises(ValueError, match="FOLDER=TASK"):
        cli.prepare(str(renamed), catalog="demo", out=str(tmp_path / "out2"), tasks="Task99_Ultrasound")


def test_checkpoint_file_picks_the_final_or_the_best_weights(tmp_path):
    """evaluate's checkpoint argument: a file as given; a run folder or bundle root: model_final.pt (the papers'
    choice) or, with which="best", model.pt."""
    from uniseg_components.workflows import checkpoint_file

    (tmp_path / "models").mkdir()
    for name in ("model.pt", "model_final.pt"):
        (tmp_path / "models" / name).write_bytes(b"")
    assert checkpoint_file(tmp_path) == tmp_path / "models" / "model_final.pt"
    assert checkpoint_file(tmp_path / "models", "best") == tmp_path / "models" / "model.pt"
    assert checkpoint_file(tmp_path / "models" / "model.pt", "final") == tmp_path / "models" / "model.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model_final.pt \(final weights\) in .*empty"):
        checkpoint_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="which must be 'final' or 'best'"):
        checkpoint_file(tmp_path, "last")

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The MedUniSeg bundle: 2D + 3D training, evaluation, inference (2D, 3D, all tasks), MONAI Label keys, resume,
multi-GPU, MedUniSeg* relearning and the release zip.

Runs the configs on a tiny demo collection (2 cases per task, 1 batch per task per epoch) on CPU.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")

from conftest import (  # noqa: E402
    BUNDLES,
    FAST,
    SCHEMA,
    assert_same_training_state,
    batch_recorder_overlay,
    config,
    error_chain,
    evaluate_run,
    interrupted_and_resumed,
    monai_label_pipeline,
    monai_label_training,
    recorded_batches,
    reference_all_tasks,
    reference_prediction,
    run,
    torchrun_training,
    workflow,
)

from uniseg_components.checkpoints import load_checkpoint  # noqa: E402
from uniseg_components.methods.meduniseg import MedUniSeg, MedUniSegStar  # noqa: E402
from uniseg_components.tasks import TaskCatalog  # noqa: E402

BUNDLE = "meduniseg_universal_segmentation"
INFERENCE, METADATA = config(BUNDLE, "inference.json"), config(BUNDLE, "metadata.json")
DEMO = TaskCatalog.builtin("demo")
TASKS_2D = [t.name for t in DEMO if t.dims == 2]
TASKS_3D = [t.name for t in DEMO if t.dims == 3]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training run from an absent dataset_dir (every demo task, 2D and 3D, is built there) with validation."""
    root = tmp_path_factory.mktemp("meduniseg")
    run(workflow(BUNDLE, "train.json", root, demo_cases=2, val_fraction=0.5, **FAST))
    return root


def _items(root: Path, section: str, task: str) -> list[dict]:
    return [it for it in json.loads((root / "demo_data" / "datalist.json").read_text())[section] if it["task"] == task]


def test_train_on_2d_and_3d_tasks_writes_model_tensorboard_and_dice(trained):
    datalist = json.loads((trained / "demo_data" / "datalist.json").read_text())
    assert {it["task"] for it in datalist["training"]} == set(DEMO.names)
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    assert isinstance(net, MedUniSeg) and cat.names == DEMO.names
    assert [t.dims for t in cat] == [t.dims for t in DEMO] and set(cat.dims) == {2, 3}
    raw = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert set(raw["model"]) == set(net.state_dict()) and not any(k.startswith("module.") for k in raw["model"])
    latest = torch.load(trained / "models" / "checkpoint_latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == len(DEMO)  # one single-task batch per task, 2D and 3D
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    summary = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert set(summary["per_task"]) == set(DEMO.names)  # the 2D tasks are validated with their own 2D windows
    assert 0.0 <= summary["mean"] <= 1.0


def test_train_properties_and_recipe(trained, tmp_path):
    wf = workflow(BUNDLE, "train.json", tmp_path, dataset_dir=str(trained / "demo_data"))
    assert wf.check_properties() in (None, [])
    p = wf.parser
    assert p["epochs"] == 1000 and p["batches_per_task"] == 50 and p["batch_size"] == 2
    assert p["learning_rate"] == 0.01 and p["momentum"] == 0.99 and p["optimizer"]["nesterov"] is True
    assert p["max_grad_norm"] == 12.0 and p["lr_scheduler"]["power"] == 0.9 and p["weight_decay"] == 3e-5
    assert p["bundle_data"]["dims"] is None and "MedUniSeg.from_catalog" in p["network_def"]
    assert p["validate"]["inferer"]["catalog"] == "@task_catalog"
    assert p["training"] == p["run"]


def test_evaluate_rebuilds_the_network_from_the_checkpoint(trained, capsys):
    out = evaluate_run(BUNDLE, trained, capsys)
    assert "fetal_us" in out and "abdomen_ct" in out


def _infer(root: Path, out: Path, **override) -> list[Path]:
    run(
        workflow(
            BUNDLE, "inference.json", root, "infer", meta_file=METADATA, output_dir=str(out), device="cpu", **override
        )
    )
    return sorted(out.glob("*.nii.gz"))


@pytest.mark.parametrize("task", ["fetal_us", "chest_xr", "abdomen_ct"])
def test_inference_2d_and_3d_on_the_input_grid(trained, tmp_path, task):
    image = _items(trained, "validation", task)[0]["image"]
    written = _infer(trained, tmp_path, datalist=image, task=task)
    assert [p.name for p in written] == [Path(image).name.replace(".nii.gz", f"_{task}.nii.gz")]
    src, lab = nib.load(image), nib.load(str(written[0]))
    # 2D tasks give 2D maps on the grid of the 2D input file
    expected = src.shape[:2] if DEMO[task].dims == 2 else src.shape[:3]
    assert lab.shape == expected
    np.testing.assert_allclose(lab.affine[:2, :2], src.affine[:2, :2], atol=1e-4)
    np.testing.assert_allclose(lab.affine[:2, 3], src.affine[:2, 3], atol=1e-3)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(range(DEMO[task].num_classes))
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    expected_map = reference_prediction(net, cat, image, task)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected_map[0].numpy())


def test_inference_all_tasks_of_a_2d_modality(trained, tmp_path):
    image = _items(trained, "validation", "fetal_us")[0]["image"]
    written = _infer(trained, tmp_path, datalist=image, task="all", modality="US")
    lab = nib.load(str(written[0]))
    assert written[0].name.endswith("_all.nii.gz") and lab.shape == nib.load(image).shape
    offset = DEMO["fetal_us"].label_offset
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, offset + 1}
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    expected, tasks = reference_all_tasks(net, cat, image, ["US"])
    assert [t.name for t in tasks] == ["fetal_us"]
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected[0].numpy())


def test_monai_label_style_inference_and_metadata(trained):
    """inference.json parsed as MONAI Label does: network_def + models/model.pt, preprocessing, inferer, post."""
    raw = Path(INFERENCE).read_text()
    assert "_meta_" not in raw
    meta = json.loads(Path(METADATA).read_text())
    assert meta["version"] in meta["changelog"] and meta["eval_metrics"]["val_mean_dice"] > 0
    out = next(iter(meta["network_data_format"]["outputs"].values()))
    default = DEMO[json.loads(raw)["task"]]
    assert out["channel_def"] == {str(i): n for i, n in enumerate(default.labels)}
    if SCHEMA.is_file():
        from monai.bundle import verify_metadata

        verify_metadata(meta_file=METADATA, filepath=str(SCHEMA), create_dir=False)

    network, pre, post, inferer = monai_label_pipeline(BUNDLE, trained, task="chest_xr")
    image = _items(trained, "validation", "chest_xr")[0]["image"]
    data = pre({"image": image, "image_path": image})  # MONAI Label's request keys
    assert data["task"] == "chest_xr" and data["image"].ndim == 3
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert data["pred"].shape[0] == 3
    pred = post(data)["pred"]
    assert pred.shape == (1, *nib.load(image).shape)


def test_monai_label_train_overrides_without_task_and_validation(trained, tmp_path):
    model = monai_label_training(BUNDLE, tmp_path, trained / "demo_data", "fetal_us", batches_per_task=2)
    net, cat = load_checkpoint(model)
    assert isinstance(net, MedUniSeg) and cat.names == DEMO.names


def test_resume_gives_the_same_weights(trained, tmp_path):
    common = {"dataset_dir": str(trained / "demo_data"), "tasks": "fetal_us,lesion_petct", "batches_per_task": 1}
    states = interrupted_and_resumed(
        BUNDLE, tmp_path, epochs=2, augment=True, **common, **{"validate#dataset#data": []}
    )
    assert states["full"]["trainer"]["iteration"] == 4  # 2 tasks (one 2D, one 3D) x 2 epochs
    assert_same_training_state(states["full"], states["resumed"])


def test_multi_gpu_overlay_two_cpu_processes(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP over a 2D and a 3D task, rank-sharded batches, rank 0 saves."""
    args = ["--dataset_dir", str(trained / "demo_data"), "--tasks", "fetal_us,brain_mr", "--epochs", "1"]
    args += ["--batches_per_task", "2", "--augment", "False"]
    torchrun_training(BUNDLE, tmp_path, *args, overlays=[batch_recorder_overlay(tmp_path)])
    seen = {r: [tuple(b["files"]) for b in recorded_batches(tmp_path / "eval", r)] for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 2  # 2 tasks x 2 batches over 2 ranks
    assert seen[0] != seen[1]
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert cat.names == ["brain_mr", "fetal_us"]


def test_relearn_trains_only_adapters_and_keeps_other_tasks(trained, tmp_path):
    root = tmp_path / "relearn"
    wf = workflow(
        BUNDLE,
        ["train.json", "relearn.json"],
        root,
        upstream_ckpt=str(trained / "models" / "model.pt"),
        dataset_dir=str(trained / "demo_data"),
        relearn_tasks="fetal_us",
        epochs=1,
        batches_per_task=3,
        augment=False,
        sw_batch_size=4,
    )
    run(wf)
    assert {it["task"] for it in wf.parser.get_parsed_content("train#dataset#data")} == {"fetal_us"}
    assert not (root / "models" / "model.pt").exists()  # never the upstream file
    ckpt = root / "models" / "relearn" / "model.pt"
    assert json.loads((root / "eval" / "relearn" / "val_dice_per_task.json").read_text())["per_task"].keys() == set(
        DEMO.names
    )
    star, cat = load_checkpoint(ckpt)
    base, _ = load_checkpoint(trained / "models" / "model.pt")
    assert isinstance(star, MedUniSegStar) and star.relearn_tasks == [cat["fetal_us"].id]
    assert torch.load(ckpt, weights_only=True)["meta"]["network"]["name"] == "MedUniSegStar"
    for k, v in base.state_dict().items():  # the upstream weights are frozen
        assert torch.equal(star.base.state_dict()[k], v), k
    assert any(bool(p.abs().sum() > 0) for n, p in star.adapters.named_parameters() if ".up." in n)  # trained
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in cat:
            x = torch.rand(1, t.num_channels, *t.patch_size, generator=g)
            same = torch.equal(star(x, t.id), base(x, t.id))
            assert same == (t.name != "fetal_us"), t.name  # other tasks bitwise unchanged, the relearned one moved

    image = _items(trained, "validation", "fetal_us")[0]["image"]
    written = _infer(root, tmp_path / "pred", ckpt_path=str(ckpt), datalist=image, task="fetal_us")
    expected = reference_prediction(star, cat, image, "fetal_us")
    np.testing.assert_array_equal(np.asarray(nib.load(str(written[0])).dataobj), expected[0].numpy())


def test_relearn_needs_a_task_or_a_threshold(trained, tmp_path):
    wf = workflow(
        BUNDLE,
        ["train.json", "relearn.json"],
        tmp_path,
        upstream_ckpt=str(trained / "models" / "model.pt"),
        dataset_dir=str(trained / "demo_data"),
        relearn_dice=str(trained / "eval" / "val_dice_per_task.json"),
        relearn_threshold=1.01,
    )
    assert wf.parser.get_parsed_content("relearn_task_names") == DEMO.names  # every task is below a Dice of 1.01
    wf.parser.update({"relearn_tasks": "nothing_like_this"})
    with pytest.raises(Exception) as err:
        wf.parser.get_parsed_content("relearn_task_names", lazy=False)
    chain = error_chain(err.value)
    assert "nothing_like_this" in chain and "fetal_us" in chain


def test_release_zip(trained, tmp_path):
    from uniseg_components.packaging import package

    zip_path = package(BUNDLES / BUNDLE, out=tmp_path / "dist", weights=trained / "models" / "model.pt")
    version = json.loads(Path(METADATA).read_text())["version"]
    assert zip_path.name == f"{BUNDLE}_v{version}.zip"
    names = set(zipfile.ZipFile(zip_path).namelist())
    for required in (
        "LICENSE",
        "docs/README.md",
        "models/model.pt",
        "scripts/methods/meduniseg/network.py",
    ) + tuple(
        f"configs/{c}" for c in ("metadata.json", "train.json", "evaluate.json", "inference.json", "relearn.json")
    ):
        assert f"{BUNDLE}/{required}" in names, required

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The upstream bundle's inference config: loaded the way MONAI Label loads it, and run with ``monai.bundle run``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, config, monai_label_pipeline, reference_all_tasks, reference_prediction, subprocess_env

from uniseg_components.checkpoints import load_checkpoint
from uniseg_components.data import prepare
from uniseg_components.demo import write_demo_collection
from uniseg_components.tasks import TaskCatalog
from uniseg_components.workflows import train

BUNDLE = "uniseg_universal_segmentation"
INFERENCE, METADATA = Path(config(BUNDLE, "inference.json")), Path(config(BUNDLE, "metadata.json"))
TASKS = ["abdomen_ct", "brain_mr", "lesion_petct"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny demo data (2 cases per 3D task) and a checkpoint from a 1-epoch, 2-batches-per-task training run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundle_inference")
    data = root / "demo_data"
    write_demo_collection(data, tasks=TASKS, num_cases=2)
    catalog = TaskCatalog.builtin("demo").select(dims=3)
    prepare(sorted(p for p in data.iterdir() if p.is_dir()), catalog, root / "prepared", val_fraction=0.5)
    train(
        root / "prepared" / "datalist.json",
        catalog=catalog,
        output_dir=root / "run",
        epochs=1,
        batches_per_task=2,
        augment=False,
        device="cpu",
        config={"log_every": 100},
    )
    bundle_root = root / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").write_bytes((root / "run" / "model.pt").read_bytes())
    return {"root": root, "data": data, "catalog": catalog, "bundle_root": bundle_root}


def _images(data: Path, task: str) -> list[Path]:
    folder = next(p for p in data.iterdir() if p.is_dir() and p.name == TaskCatalog.builtin("demo")[task].dataset)
    return sorted((folder / "imagesTr").glob("*.nii.gz"))


def test_inference_config_has_monai_label_keys_and_no_meta_refs() -> None:
    raw = INFERENCE.read_text()
    assert "@_meta_" not in raw and "_meta_#" not in raw and "_meta_::" not in raw
    cfg = json.loads(raw)
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root", "dataset_dir"):
        assert key in cfg, key
    meta = json.loads(METADATA.read_text())
    first_out = next(iter(meta["network_data_format"]["outputs"].values()))
    catalog = TaskCatalog.builtin("demo").select(dims=3)
    default = catalog[cfg["task"]]
    assert first_out["channel_def"] == {str(i): name for i, name in enumerate(default.labels)}
    assert first_out["num_channels"] == default.num_classes
    assert meta["version"] in meta["changelog"]


def test_monai_label_style_inference(trained: dict) -> None:
    """network_def + models/model.pt ('model' key), preprocessing, inferer(inputs, network), postprocessing."""
    network, pre, post, inferer = monai_label_pipeline(BUNDLE, trained["bundle_root"])
    image = _images(trained["data"], "abdomen_ct")[0]

    # MONAI Label's request: no task (the config's default is used), and "image_path" beside "image"
    data = pre({"image": str(image), "image_path": str(image)})
    assert data["task"] == "abdomen_ct"
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert data["pred"].shape[0] == 3
    pred = post(data)["pred"]

    src = nib.load(str(image))
    assert pred.shape == (1, *src.shape)
    np.testing.assert_allclose(np.asarray(pred.affine), src.affine, atol=1e-4)
    values = set(torch.unique(pred).tolist())
    assert values <= {0.0, 1.0, 2.0}

    net, cat = load_checkpoint(trained["bundle_root"] / "models" / "model.pt")
    expected = reference_prediction(net, cat, str(image), "abdomen_ct")
    assert torch.equal(pred.to(torch.int16).cpu(), expected.to(torch.int16).cpu())


def _run_bundle(bundle_root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--meta_file", str(METADATA),
        "--logging_file", "False", "--bundle_root", str(bundle_root), "--output_dir", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bundle_run_single_task(trained: dict, tmp_path: Path) -> None:
    images = _images(trained["data"], "brain_mr")
    folder = tmp_path / "in"
    folder.mkdir()
    for img in images:
        (folder / img.name).write_bytes(img.read_bytes())
    out = tmp_path / "out"
    _run_bundle(trained["bundle_root"], out, "--dataset_dir", str(folder), "--task", "brain_mr")
    written = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in written] == [img.name.replace(".nii.gz", "_brain_mr.nii.gz") for img in images]
    for img, seg in zip(images, written):
        src, lab = nib.load(str(img)), nib.load(str(seg))
        assert lab.shape == src.shape[:3]
        np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_bundle_run_all_tasks_merged(trained: dict, tmp_path: Path) -> None:
    image = _images(trained["data"], "abdomen_ct")[0]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps([str(image)]))
    out = tmp_path / "out"
    _run_bundle(trained["bundle_root"], out, "--datalist", str(datalist), "--task", "all", "--modality", "CT")
    written = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in written] == [image.name.replace(".nii.gz", "_all.nii.gz")]
    lab = nib.load(str(written[0]))
    src = nib.load(str(image))
    assert lab.shape == src.shape
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    # CT-only tasks of the demo catalog: abdomen_ct, labels 1-2 with offset 0
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2}

    net, cat = load_checkpoint(trained["bundle_root"] / "models" / "model.pt")
    expected, tasks = reference_all_tasks(net, cat, str(image), ["CT"])
    assert [t.name for t in tasks] == ["abdomen_ct"]
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected[0].numpy())


def test_inference_workflow_properties(trained: dict) -> None:
    """The model-zoo CI check: the inference workflow has every required property."""
    from monai.bundle import ConfigWorkflow

    folder = _images(trained["data"], "abdomen_ct")[0].parent
    workflow = ConfigWorkflow(
        config_file=str(INFERENCE),
        meta_file=str(METADATA),
        logging_file=None,
        workflow_type="infer",
        bundle_root=str(trained["bundle_root"]),
        device="cpu",
        dataset_dir=str(folder),
        load_pretrain=False,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert len(workflow.dataset) == len(list(folder.glob("*.nii.gz")))
    assert workflow.inferer.task_id == trained["catalog"]["abdomen_ct"].id


class _StubNet(torch.nn.Module):
    """Logits that encode the task: channel ``task_id`` is highest; ``forward_all_tasks`` gives one per task."""

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4, *x.shape[2:])
        out[:, int(task_id)] = 1.0
        return out

    def forward_all_tasks(self, x: torch.Tensor, task_ids) -> list[torch.Tensor]:
        return [self(x, t) for t in task_ids]


def test_inferer_bound_task_and_merged_tasks() -> None:
    from uniseg_components.inferers import MergedTasksInferer, TaskSlidingWindowInferer

    x = torch.rand(1, 1, 16, 16, 16)
    bound = TaskSlidingWindowInferer((8, 8, 8), task_id=2)
    assert bound(x, _StubNet()).argmax(1).unique().tolist() == [2]
    assert bound(x, _StubNet(), task_id=1).argmax(1).unique().tolist() == [1]  # an explicit task id wins
    with pytest.raises(TypeError):
        TaskSlidingWindowInferer((8, 8, 8))(x, _StubNet())  # no task anywhere

    catalog = TaskCatalog.builtin("demo").select(dims=3)
    tasks = [catalog["abdomen_ct"], catalog["brain_mr"]]
    merged = MergedTasksInferer((8, 8, 8), tasks=tasks)(x, _StubNet(), task_id=0)
    # abdomen_ct predicts class 0 (background), brain_mr class 1 (csf) -> offset 2 + 1 = 3 everywhere
    assert merged.shape == (1, 1, 16, 16, 16) and merged.unique().tolist() == [3.0]
    with pytest.raises(ValueError, match="at least one task"):
        MergedTasksInferer((8, 8, 8), tasks=[])


def test_list_images(tmp_path: Path) -> None:
    from uniseg_components.io import list_images

    for name in ("b.nii.gz", "a.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == [{"image": str(tmp_path / "a.nii.gz")}, {"image": str(tmp_path / "b.nii.gz")}]
    js = tmp_path / "list.json"
    js.write_text(json.dumps({"validation": [{"image": "x.nii.gz", "label": "y.nii.gz", "task": "brain_mr"}]}))
    assert list_images(js) == [{"image": "x.nii.gz", "task": "brain_mr"}]
    assert list_images(["p.nii.gz"]) == [{"image": "p.nii.gz"}]
    with pytest.raises(FileNotFoundError, match="no image folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no image found .*no DICOM file"):
        list_images(tmp_path / "empty_dir")

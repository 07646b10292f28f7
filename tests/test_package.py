# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Release zips: model-zoo layout, vendored package, and inference from the unzipped bundle without the install."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, run_vendored_inference

from uniseg_components import cli
from uniseg_components.checkpoints import CheckpointMeta
from uniseg_components.demo import write_demo_collection
from uniseg_components.methods.uniseg import UniSegDownstream
from uniseg_components.methods.uniseg.finetune import task_catalog
from uniseg_components.packaging import bundle_files, package, sha1sum

NAME = "uniseg_finetune_segmentation"
BUNDLE = BUNDLES / NAME


def _bundle_copy(tmp_path: Path) -> Path:
    """A copy of the fine-tune bundle with a models/model.pt and clutter that must stay out of the zip."""
    import shutil

    dst = tmp_path / "src" / NAME
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("eval", "demo_data", "models", "__pycache__"))
    (dst / "models").mkdir()
    torch.manual_seed(0)
    cat = task_catalog("demo", "abdomen_ct")
    net = UniSegDownstream.from_catalog(cat)
    torch.save({"model": net.state_dict(), "meta": CheckpointMeta(net, cat).state_dict()}, dst / "models" / "model.pt")
    (dst / "models" / "model_final.pt").write_bytes(b"x")  # training-only file
    for junk in ("eval/metrics.csv", "demo_data/x.nii.gz", "demo_data_new/y.nii.gz", "configs/__pycache__/a.pyc"):
        (dst / junk).parent.mkdir(parents=True, exist_ok=True)
        (dst / junk).write_text("junk")
    return dst


def test_package_layout_and_errors(tmp_path):
    src = _bundle_copy(tmp_path)
    zip_path = Path(cli.package(str(src), out=str(tmp_path / "dist")))
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert zip_path == tmp_path / "dist" / f"{NAME}_v{version}.zip"
    names = zipfile.ZipFile(zip_path).namelist()
    assert all(n.startswith(f"{NAME}/") for n in names)
    for required in (
        "LICENSE",
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "models/model.pt",
    ):
        assert f"{NAME}/{required}" in names
    assert f"{NAME}/scripts/__init__.py" in names  # the zoo's and MONAI Label's place for a bundle's own code
    assert f"{NAME}/scripts/catalogs/demo.json" in names
    assert not any(n.startswith(f"{NAME}/uniseg_components/") for n in names)
    with zipfile.ZipFile(zip_path) as zf:
        configs = [
            zf.read(n).decode()
            for n in names
            if n.startswith(f"{NAME}/configs/") and n.endswith(".json") and not n.endswith("tasks.json")
        ]
    assert all("uniseg_components" not in c for c in configs) and any("$import scripts" in c for c in configs)
    assert not any(
        ("__pycache__" in n or "/eval/" in n or "/demo_data" in n or n.endswith("model_final.pt")) for n in names
    )
    assert not any(p.name.startswith(".") for p in (tmp_path / "dist").iterdir())  # no temporary file left
    meta = json.loads(zipfile.ZipFile(zip_path).read(f"{NAME}/configs/metadata.json"))
    assert "uniseg-components" not in meta["required_packages_version"]  # vendored, not installed
    # same inputs, same bytes
    first = sha1sum(zip_path)
    assert sha1sum(package(src, out=tmp_path / "dist")) == first
    assert {p.as_posix() for p in bundle_files(src)} >= {"LICENSE", "models/model.pt", "docs/README.md"}
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        package(tmp_path, out=tmp_path / "dist")


def test_unzipped_bundle_runs_inference_without_the_installed_package(tmp_path):
    src = _bundle_copy(tmp_path)
    zip_path = package(src, out=tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / NAME
    demo = write_demo_collection(tmp_path / "demo", tasks=["abdomen_ct"], num_cases=1)
    image = sorted((demo / "Demo01_AbdomenCT" / "imagesTr").glob("*.nii.gz"))[0]
    out_dir = tmp_path / "pred"
    out = run_vendored_inference(root, images=str(image), output_dir=str(out_dir), device="cpu")
    assert str(root) in out  # the vendored package
    outputs = list(out_dir.glob("*.nii.gz"))
    assert len(outputs) == 1
    pred, img = nib.load(str(outputs[0])), nib.load(str(image))
    assert pred.shape[:3] == img.shape[:3]
    np.testing.assert_allclose(pred.affine, img.affine, atol=1e-3)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Tests of uniseg_components.planning: dataset.json (MSD v1, nnU-Net v2) + fingerprints -> a catalog."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from uniseg_components.cli import main
from uniseg_components.data import load_datalist, read_msd_dataset
from uniseg_components.networks import auto_plan
from uniseg_components.planning import (
    canonical_modality,
    estimate_memory_gib,
    fingerprint_dataset,
    plan,
    plan_catalog,
    plan_network,
    target_spacing,
)
from uniseg_components.tasks import TaskCatalog
from uniseg_components.transforms import NormalizeModalityd


def _save(path: Path, array: np.ndarray, spacing, axes=(0, 1, 2)) -> None:
    """Write a NIfTI whose voxel axis i runs along world axis ``axes[i]`` with ``spacing[i]`` mm."""
    aff = np.zeros((4, 4))
    for i, a in enumerate(axes):
        aff[a, i] = spacing[i]
    aff[3, 3] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, aff), str(path))


def _case(shape, rng, fg_value=100.0, bg_value=-1000.0):
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(s // 4, s // 4 + max(2, s // 3)) for s in shape)] = 1
    img = np.where(lab > 0, fg_value + rng.normal(0, 10, shape), bg_value).astype(np.float32)
    return img, lab


def msd_v1(
    root: Path,
    name: str,
    cases: list[tuple[tuple[int, ...], tuple[float, ...]]],
    channel_names=("CT",),
    labels=None,
    seed=0,
) -> Path:
    """An MSD v1 folder: one file per image (channels last), ``training`` list, ``modality`` / ``labels`` by value."""
    rng = np.random.default_rng(seed)
    folder = root / name
    training = []
    for i, (shape, spacing) in enumerate(cases):
        img, lab = _case(shape, rng)
        if len(channel_names) > 1:
            img = np.stack([img] * len(channel_names), axis=-1)
        _save(folder / "imagesTr" / f"c{i:02d}.nii.gz", img, spacing)
        _save(folder / "labelsTr" / f"c{i:02d}.nii.gz", lab, spacing)
        training.append({"image": f"./imagesTr/c{i:02d}.nii.gz", "label": f"./labelsTr/c{i:02d}.nii.gz"})
    meta = {
        "name": name,
        "modality": {str(c): m for c, m in enumerate(channel_names)},
        "labels": labels if labels is not None else {"0": "background", "1": "organ"},
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def nnunet_v2(root: Path, name: str, cases, channel_names=("T2", "ADC"), axes=(0, 1, 2), seed=0) -> Path:
    """An nnU-Net v2 folder: one file per channel ``<case>_<XXXX>.nii.gz``, ``labels`` by name, no training list."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for i, (shape, spacing) in enumerate(cases):
        img, lab = _case(shape, rng, fg_value=5.0, bg_value=0.0)
        for c in range(len(channel_names)):
            _save(folder / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz", img + c, spacing, axes)
        _save(folder / "labelsTr" / f"case{i:02d}.nii.gz", lab, spacing, axes)
    meta = {
        "channel_names": {str(c): m for c, m in enumerate(channel_names)},
        "labels": {"background": 0, "prostate": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


# ---------------------------------------------------------------------------------------------- dataset.json
def test_both_dataset_json_layouts(tmp_path):
    v1 = msd_v1(tmp_path, "Task03_Liver", [((24, 24, 10), (0.8, 0.8, 2.5))] * 3)
    v2 = nnunet_v2(tmp_path, "Dataset005_Prostate", [((20, 20, 8), (0.6, 0.6, 3.6))] * 2)
    items = read_msd_dataset(v2)
    assert [Path(p).name for p in items[0]["image"]] == ["case00_0000.nii.gz", "case00_0001.nii.gz"]
    assert Path(items[1]["label"]).name == "case01.nii.gz"
    fp1, fp2 = fingerprint_dataset(v1, progress=False), fingerprint_dataset(v2, progress=False)
    assert fp1["modalities"] == ["CT"] and fp1["labels"] == ["background", "organ"] and fp1["dims"] == 3
    assert fp2["modalities"] == ["T2", "ADC"] and fp2["labels"] == ["background", "prostate"]
    assert fp2["cases"][0]["spacing"] == pytest.approx([0.6, 0.6, 3.6])
    assert fp2["cases"][0]["shape"] == [20, 20, 8]
    assert fp1["ct_foreground"]["mean"] == pytest.approx(100, abs=2) and fp2["ct_foreground"] is None
    cat = plan_catalog([fp1, fp2], gpu_memory_gb=10)
    assert cat.names == ["liver", "prostate"]
    assert [t.dataset for t in cat] == ["Task03_Liver", "Dataset005_Prostate"]
    assert cat["prostate"].modalities == ("T2", "ADC") and cat["prostate"].labels == ("background", "prostate")
    assert cat["liver"].spacing == (0.8, 0.8, 2.5) and cat["prostate"].spacing == (0.6, 0.6, 3.6)


def test_spacing_and_shape_in_ras_order(tmp_path):
    # voxel axis 0 runs along world z: the fingerprint reports MONAI's (x, y, z) order after Orientationd("RAS")
    v2 = nnunet_v2(tmp_path, "Dataset001_Sag", [((8, 20, 22), (4.0, 0.5, 0.6))], channel_names=("MR",), axes=(2, 0, 1))
    case = fingerprint_dataset(v2, progress=False)["cases"][0]
    assert case["spacing"] == pytest.approx([0.5, 0.6, 4.0]) and case["shape"] == [20, 22, 8]


def test_modality_aliases():
    assert [canonical_modality(m) for m in ("CT", "MRI", "t1gd", "T2w", "FLAIR", "adc")] == [
        "CT",
        "MR",
        "T1c",
        "T2",
        "FLAIR",
        "ADC",
    ]
    with pytest.raises(ValueError, match=r"x/dataset.json: channel name 'noNorm' is not a known modality"):
        canonical_modality("noNorm", "x/dataset.json")


# ---------------------------------------------------------------------------------------------- spacing, plan
def test_target_spacing_median_and_anisotropic_rule():
    assert target_spacing([[1, 1, 2], [1, 1, 3], [2, 2, 4]], [[100, 100, 50]] * 3) == [1.0, 1.0, 3.0]
    # thick slices (5 mm, 40 voxels along z vs 512 in-plane): the 10th percentile along z, not the median
    sp = [[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 1.25]] * 2
    assert target_spacing(sp, [[512, 512, 40]] * 10) == [0.7, 0.7, 1.25]
    # anisotropic spacing but many voxels along z: the median stays
    assert target_spacing(sp, [[512, 512, 400]] * 10) == [0.7, 0.7, 5.0]


def test_paper_spacing_gives_the_paper_topology():
    paper = TaskCatalog.builtin("uniseg_11tasks").plan
    auto = auto_plan((192, 192, 64), (1.5, 1.5, 3.0)).to_dict()
    for key in ("features", "kernel_sizes", "strides"):
        assert auto[key] == paper[key], key
    # the one difference: UniSeg's last decoder stage convolves 3x3x3, the default (encoder's level-0 kernel) 3x3x1
    assert auto["decoder_kernel_sizes"][:-1] == paper["decoder_kernel_sizes"][:-1]
    # the memory model is calibrated on the paper plan (6.4 GiB measured, fp16, batch 2)
    assert 6.0 < estimate_memory_gib(auto_plan((192, 192, 64), (1.5, 1.5, 3.0)), 2, 1, 3) < 6.6
    net = plan_network((1.5, 1.5, 3.0), (256, 256, 150), gpu_memory_gb=10, in_channels=4, num_classes=4)
    assert net.to_dict()["strides"] == paper["strides"] and net.to_dict()["kernel_sizes"] == paper["kernel_sizes"]
    assert net.patch_size == (192, 160, 112)  # documented in docs/benchmarks.md beside the paper's (192, 192, 64)


def test_memory_budget():
    small = plan_network((1.0, 1.0, 1.0), (300, 300, 300), gpu_memory_gb=4)
    large = plan_network((1.0, 1.0, 1.0), (300, 300, 300), gpu_memory_gb=16)
    assert estimate_memory_gib(small) <= 4 < estimate_memory_gib(large) <= 16
    assert np.prod(small.patch_size) < np.prod(large.patch_size)
    assert all(p % s == 0 for p, s in zip(small.patch_size, small.total_stride))
    # never larger than the data: a small median shape caps the patch
    assert plan_network((1.0, 1.0, 1.0), (40, 48, 36), gpu_memory_gb=80).patch_size == (40, 48, 32)
    with pytest.raises(ValueError, match="no patch fits 0.001 GiB"):
        plan_network((1.0, 1.0, 1.0), (300, 300, 300), gpu_memory_gb=0.001)
    # thin data: the axes that cannot shrink are left alone, and the search ends with the error
    with pytest.raises(ValueError, match="no patch fits"):
        plan_network((1.0, 1.0, 1.0), (4, 4, 300), gpu_memory_gb=0.001)
    # an axis too short to pool does not stop the others (nnU-Net: the finest of the poolable axes)
    assert plan_network((1.0, 1.0, 1.0), (10, 512, 512)).total_stride[1:] == (32, 32)


def test_2d_task_beside_3d_tasks(tmp_path):
    ct = msd_v1(tmp_path, "Task01_CT", [((40, 40, 20), (1.0, 1.0, 2.0))] * 2)
    us = nnunet_v2(tmp_path, "Dataset002_US", [((100, 84, 1), (0.2, 0.2, 1.0))] * 2, channel_names=("US",))
    cat = plan_catalog([fingerprint_dataset(ct, progress=False), fingerprint_dataset(us, progress=False)])
    assert cat["us"].dims == 2 and cat["us"].spacing == (0.2, 0.2) and cat["ct"].dims == 3
    stride = auto_plan(cat.plan["patch_size"], cat["ct"].spacing).total_stride[:2]
    assert all(p % s == 0 for p, s in zip(cat["us"].patch_size, stride))


def test_ct_normalization_from_foreground(tmp_path):
    ct = msd_v1(tmp_path, "Task01_CT", [((24, 24, 12), (1.0, 1.0, 1.0))] * 3)
    catalog = TaskCatalog.load(plan(ct, tmp_path / "plan", ct_normalization="foreground", progress=False))
    t = catalog["ct"]
    assert t.ct_zscore[0] == pytest.approx(100, abs=2) and t.ct_zscore[1] == pytest.approx(10, abs=1.5)
    assert t.ct_window[0] < 100 < t.ct_window[1]
    x = torch.tensor([[[[100.0, -1000.0]]]])
    out = NormalizeModalityd("image", catalog)({"image": x, "task": "ct"})["image"]
    assert float(out[0, 0, 0, 0]) == pytest.approx((100 - t.ct_zscore[0]) / t.ct_zscore[1], abs=1e-5)
    assert float(out[0, 0, 0, 1]) == pytest.approx((t.ct_window[0] - t.ct_zscore[0]) / t.ct_zscore[1], abs=1e-5)
    window = TaskCatalog.load(plan(ct, tmp_path / "plan2", progress=False))["ct"]
    assert window.ct_zscore is None and window.ct_window is None  # UniSeg's fixed window, the default
    assert (tmp_path / "plan" / "fingerprint.json").is_file()


def test_nonzero_mask_planned_by_nnunets_rule(tmp_path):
    """z-scored data whose crop to the non-zero region keeps < 3/4 of the volume (skull-stripped MR on a zero
    background) gets nonzero_mask; MR without a zero background and CT do not."""
    cases = [((24, 24, 12), (1.0, 1.0, 1.0))] * 3
    stripped = msd_v1(tmp_path, "Task01_Brain", cases, channel_names=("T1",))
    for p in sorted((stripped / "imagesTr").glob("*.nii.gz")):
        img = nib.load(p)
        lab = np.asarray(nib.load(stripped / "labelsTr" / p.name).dataobj)
        _save(p, np.where(lab > 0, np.asarray(img.dataobj), 0.0).astype(np.float32), (1.0, 1.0, 1.0))
    whole = msd_v1(tmp_path, "Task02_MR", cases, channel_names=("T1",))
    ct = msd_v1(tmp_path, "Task03_CT", cases)
    fps = {f.name: fingerprint_dataset(f, progress=False) for f in (stripped, whole, ct)}
    assert fps["Task01_Brain"]["nonzero_fraction"] == pytest.approx((8 * 8 * 4) / (24 * 24 * 12))
    assert fps["Task02_MR"]["nonzero_fraction"] == 1.0 and fps["Task03_CT"]["nonzero_fraction"] is None
    catalog = TaskCatalog.load(plan([stripped, whole, ct], tmp_path / "plan", progress=False))
    assert [t.nonzero_mask for t in catalog] == [True, False, False]


# ---------------------------------------------------------------------------------------------- bad input
def test_dataset_json_without_labels(tmp_path):
    folder = msd_v1(tmp_path, "Task01_CT", [((16, 16, 8), (1.0, 1.0, 1.0))], labels={})
    with pytest.raises(ValueError, match=r"Task01_CT/dataset.json' has no 'labels'"):
        fingerprint_dataset(folder, progress=False)


def test_inconsistent_spacings_within_a_case(tmp_path):
    folder = nnunet_v2(tmp_path, "Dataset001_P", [((16, 16, 8), (0.5, 0.5, 3.0))] * 2)
    _save(folder / "imagesTr" / "case01_0001.nii.gz", np.zeros((16, 16, 8), np.float32), (0.5, 0.5, 2.0))
    with pytest.raises(ValueError, match=r"case01_0001.nii.gz: inconsistent spacings within the case"):
        fingerprint_dataset(folder, progress=False)


def test_folder_without_dataset_json(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nothing/dataset.json"):
        plan(tmp_path / "nothing", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_channel_file_is_named(tmp_path):
    folder = nnunet_v2(tmp_path, "Dataset001_P", [((16, 16, 8), (0.5, 0.5, 3.0))] * 2)
    (folder / "imagesTr" / "case00_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case00_0001.nii.gz: file does not exist"):
        fingerprint_dataset(folder, progress=False)


# ---------------------------------------------------------------------------------------------- CLI
def test_prepare_without_catalog_plans_from_the_data(tmp_path, capsys):
    ct = msd_v1(tmp_path / "data", "Task03_Liver", [((24, 24, 10), (0.8, 0.8, 2.5))] * 3)
    v2 = nnunet_v2(tmp_path / "data", "Dataset005_Prostate", [((20, 20, 8), (0.6, 0.6, 3.6))] * 3)
    main(["prepare", str(tmp_path / "data"), "--out", str(tmp_path / "prepared")])
    train, val, catalog_path = load_datalist(tmp_path / "prepared" / "datalist.json")
    catalog = TaskCatalog.load(catalog_path)
    assert catalog.names == ["prostate", "liver"] and len(train) + len(val) == 6  # folders in name order
    assert {it["task"] for it in val} == {"liver", "prostate"}
    assert isinstance(next(it for it in train if it["task"] == "prostate")["image"], list)
    assert (tmp_path / "prepared" / "fingerprint.json").is_file()
    # `plan` on its own writes the same catalog
    main(["plan", f"{v2},{ct}", "--out", str(tmp_path / "plan")])
    assert TaskCatalog.load(tmp_path / "plan" / "tasks.json") == catalog
    # and the planned collection trains and evaluates with a bundle (two-channel nnU-Net v2 images included)
    main(
        [
            "train",
            str(tmp_path / "prepared" / "datalist.json"),
            "--output_dir",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batches_per_task",
            "2",
            "--val_interval",
            "1",
            "--augment",
            "False",
        ]
    )
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "run" / "model.pt"), str(tmp_path / "prepared" / "datalist.json")])
    table = capsys.readouterr().out
    assert "prostate" in table and "liver" in table
    # infer takes one file per image: a one-file-per-channel case is refused by name, nothing written
    from uniseg_components.workflows import infer

    split = [{"image": it["image"], "task": "prostate"} for it in val if it["task"] == "prostate"]
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"case\d\d_0000.nii.gz.*one file per channel"):
        infer(tmp_path / "run" / "model.pt", str(tmp_path / "split.json"), "prostate", out=tmp_path / "pred")
    assert not (tmp_path / "pred").exists()

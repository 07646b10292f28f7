# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The disk cache of the real-scale data path (DiskCacheDataset, cached_dataset) and the default worker count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import FAST, mixed_catalog, run, subprocess_env, workflow
from monai.data import CacheDataset
from monai.transforms import Compose

from uniseg_components.data import DiskCacheDataset, cached_dataset, default_num_workers, load_datalist
from uniseg_components.tasks import TaskCatalog
from uniseg_components.transforms import TaskRandCropd, deterministic_transforms, train_transforms


def _items(root: Path, n: int = 3) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = rng.normal(0, 100, (20, 18, 14)).astype(np.float32)
        lab = np.zeros((20, 18, 14), np.uint8)
        lab[5:10, 5:10, 4:8] = 1 + i % 2
        for kind, arr in (("img", img), ("lab", lab)):
            nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.5, 1])), str(root / f"{kind}{i}.nii.gz"))
        items.append({"image": str(root / f"img{i}.nii.gz"), "label": str(root / f"lab{i}.nii.gz"), "task": "organ_ct"})
    return items


def _cached(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


def test_disk_cache_is_the_deterministic_pipeline_and_is_reused(tmp_path):
    items, cat = _items(tmp_path), mixed_catalog()
    ds = DiskCacheDataset(items, train_transforms(cat, augment=False), tmp_path / "cache")
    assert ds.precompute(progress=False) == 3 and len(_cached(tmp_path / "cache")) == 3
    direct = Compose(deterministic_transforms(cat))(dict(items[1]))
    cached = torch.load(ds.cache_file(1), weights_only=False)
    assert torch.equal(cached["image"], direct["image"]) and torch.equal(cached["label"], direct["label"])
    assert torch.allclose(cached["image"].affine, direct["image"].affine)  # metadata kept (MetaTensor)
    sample = ds[1]
    assert sample["image"].shape == (1, 16, 16, 12) and sample["task_id"] == 0
    # a new dataset, in this process or another (other hash seed), finds every case cached
    assert DiskCacheDataset(items, train_transforms(cat, augment=False), tmp_path / "cache").precompute() == 0
    code = (
        "import sys, json; from conftest import mixed_catalog; from uniseg_components.data import DiskCacheDataset;"
        "from uniseg_components.transforms import train_transforms;"
        "ds = DiskCacheDataset(json.loads(sys.argv[1]), train_transforms(mixed_catalog()), sys.argv[2]);"
        "print(ds.precompute(progress=False))"
    )
    env = {**subprocess_env(), "PYTHONHASHSEED": "123"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    args = [sys.executable, "-c", code, json.dumps(items), str(tmp_path / "cache")]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_disk_cache_invalidation(tmp_path):
    items = _items(tmp_path)
    cache = tmp_path / "cache"
    assert DiskCacheDataset(items, train_transforms(mixed_catalog()), cache).precompute(progress=False) == 3
    # another catalog (a task's target spacing): every case again, into new files
    other = mixed_catalog(ct_spacing=(3.0, 3.0, 3.0))
    ds = DiskCacheDataset(items, train_transforms(other), cache)
    assert ds.precompute(progress=False) == 3 and len(_cached(cache)) == 6
    assert torch.load(ds.cache_file(0), weights_only=False)["image"].shape[1] == 10  # 20 x 1.5 mm at 3 mm
    # a replaced image: that case only
    img = nib.load(items[2]["image"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :12] * 2, img.affine), items[2]["image"])
    lab = nib.load(items[2]["label"])
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :12], lab.affine), items[2]["label"])
    assert ds.precompute(progress=False) == 1 and len(_cached(cache)) == 7


def test_disk_cache_bad_case_names_the_file(tmp_path):
    items = _items(tmp_path, 2)
    Path(items[1]["label"]).write_bytes(b"not a nifti")
    ds = DiskCacheDataset(items, train_transforms(mixed_catalog()), tmp_path / "cache")
    with pytest.raises(Exception) as info:
        ds.precompute(progress=False)
    assert "lab1.nii.gz" in str(info.value) + str(info.value.__cause__)
    assert len(_cached(tmp_path / "cache")) <= 1  # the good case only; no half-written file
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_cached_dataset_in_ram_without_cache_dir(tmp_path):
    """Training transforms: the deterministic part is cached (RAM or disk), the random part runs per access in a
    PatchDataset that takes the sampler's (index, force) pairs; validation transforms: the cached dataset itself."""
    from uniseg_components.data import PatchDataset
    from uniseg_components.transforms import FORCE_FG_KEY, val_transforms

    items = _items(tmp_path, 2)
    cat = mixed_catalog()
    ds = cached_dataset(items, train_transforms(cat))
    assert isinstance(ds, PatchDataset) and isinstance(ds.dataset, CacheDataset) and len(ds) == 2
    assert ds.data == items and FORCE_FG_KEY not in ds[(0, True)] and tuple(ds[1]["image"].shape[1:]) == (16, 16, 12)
    assert bool(ds[(0, True)]["label"].sum() > 0)
    assert not any(isinstance(t, TaskRandCropd) for t in ds.dataset.transform.transforms)  # nothing random cached
    assert isinstance(cached_dataset(items, val_transforms(cat)), CacheDataset)
    ds = cached_dataset(items, train_transforms(cat), cache_dir=tmp_path / "c", num_workers=2)
    assert isinstance(ds.dataset, DiskCacheDataset) and len(_cached(tmp_path / "c")) == 2


def test_cache_keys_of_path_items_differ(tmp_path):
    from uniseg_components.data import item_hash

    items = _items(tmp_path, 2)
    as_paths = [{k: Path(v) if k != "task" else v for k, v in it.items()} for it in items]
    assert item_hash(as_paths[0]) != item_hash(as_paths[1])
    assert item_hash(as_paths[0]) == item_hash(items[0])  # a Path and its string are the same case


def test_default_num_workers(monkeypatch):
    for cpus, expected in ((1, 0), (2, 0), (4, 2), (16, 14), (128, 16)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        assert default_num_workers() == expected


@pytest.mark.usefixtures("single_thread")
def test_bundle_trains_from_the_disk_cache(tmp_path):
    pytest.importorskip("nilearn")
    cache = tmp_path / "cache"
    wf = workflow("uniseg_universal_segmentation", "train.json", tmp_path, demo_cases=3, cache_dir=str(cache), **FAST)
    run(wf)
    train, val, _ = load_datalist(tmp_path / "demo_data" / "datalist.json")
    assert len(_cached(cache)) == len(train) + len(val)  # train and validation cases, each preprocessed once
    assert (tmp_path / "models" / "model.pt").is_file()
    catalog = TaskCatalog.load(tmp_path / "demo_data" / "tasks.json")
    assert catalog.names[:3] == ["abdomen_ct", "brain_mr", "lesion_petct"]

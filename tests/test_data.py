# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Tests of uniseg_components.data: MSD folders -> validated datalist, and the task-balanced batch sampler."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import mixed_catalog
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, Identityd

from uniseg_components.data import TaskBalancedBatchSampler, case_id, load_datalist, prepare, read_msd_dataset
from uniseg_components.tasks import TaskCatalog
from uniseg_components.transforms import train_transforms

CATALOG = mixed_catalog()


def make_msd(root: Path, name: str, n: int, channels: int = 1, dims: int = 3, num_classes: int = 2, seed: int = 0):
    """Write a tiny MSD-format folder with ``n`` cases; returns the folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shape = (20, 18, 14) if dims == 3 else (30, 26)
    aff = np.diag([2.0, 2.0, 2.0, 1.0]) if dims == 3 else np.diag([1.0, 1.0, 1.0, 1.0])
    training = []
    for i in range(n):
        img = rng.normal(0, 100, shape + ((channels,) if channels > 1 else ())).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[tuple(slice(s // 3, s // 3 + 4) for s in shape)] = 1
        if num_classes > 2:
            lab[tuple(slice(s // 3, s // 3 + 2) for s in shape)] = num_classes - 1
        nib.save(nib.Nifti1Image(img, aff), str(folder / "imagesTr" / f"case_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {
        "name": name,
        "modality": {str(c): "CT" for c in range(channels)},
        "labels": {str(c): f"class{c}" for c in range(num_classes)},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture()
def collection(tmp_path):
    return [
        make_msd(tmp_path / "data", "Test01_CT", 5, num_classes=3, seed=1),
        make_msd(tmp_path / "data", "Test02_PETCT", 3, channels=2, seed=2),
        make_msd(tmp_path / "data", "Test03_US2D", 4, dims=2, seed=3),
    ]


# ---------------------------------------------------------------------------------------------- MSD folders
def test_read_msd_dataset(collection):
    items = read_msd_dataset(collection[0])
    assert len(items) == 5
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in items)
    assert items[0]["label"].endswith("labelsTr/case_000.nii.gz")


def test_read_nnunet_v1_raw_folder(collection, tmp_path):
    """nnU-Net v1 raw data (the UniSeg authors' conversion output): dataset.json lists ./imagesTr/x.nii.gz, the disk
    holds x_0000.nii.gz, x_0001.nii.gz (one per modality): those are read, and prepare accepts the folder."""
    petct = collection[1]
    for p in sorted((petct / "imagesTr").glob("*.nii.gz")):
        img = nib.load(p)
        data = np.asarray(img.dataobj)
        for c in range(data.shape[-1]):
            nib.save(
                nib.Nifti1Image(data[..., c], img.affine), p.with_name(p.name.replace(".nii.gz", f"_{c:04d}.nii.gz"))
            )
        p.unlink()
    items = read_msd_dataset(petct)
    assert len(items) == 3 and all(isinstance(it["image"], list) and len(it["image"]) == 2 for it in items)
    assert items[0]["image"][1].endswith("imagesTr/case_000_0001.nii.gz") and Path(items[0]["image"][1]).is_file()
    train, val, _ = load_datalist(prepare([petct], CATALOG, tmp_path / "prep", val_fraction=0.0))
    assert len(train) == 3 and all(it["task"] == "lesion_petct" and len(it["image"]) == 2 for it in train)


def test_load_datalist_resolves_relative_channel_files(tmp_path):
    (tmp_path / "datalist.json").write_text(
        json.dumps({"training": [{"image": ["a_0000.nii.gz", "/abs/a_0001.nii.gz"], "label": "a.nii.gz", "task": "t"}]})
    )
    train, _, _ = load_datalist(tmp_path / "datalist.json")
    assert train[0]["image"] == [str(tmp_path / "a_0000.nii.gz"), "/abs/a_0001.nii.gz"]
    assert train[0]["label"] == str(tmp_path / "a.nii.gz")


def test_read_msd_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_msd_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/dataset\.json"):
        read_msd_dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/dataset\.json.*not valid JSON"):
        read_msd_dataset(bad)
    (bad / "dataset.json").write_text(json.dumps({"labels": {}}))
    with pytest.raises(ValueError, match=r"bad/dataset\.json.*neither a 'training' list.*nor 'channel_names'"):
        read_msd_dataset(bad)


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_writes_split_datalist(collection, tmp_path):
    out = tmp_path / "prepared"
    path = prepare(collection, CATALOG, out, val_fraction=0.25, seed=3)
    assert path == out / "datalist.json"
    train, val, catalog_path = load_datalist(path)
    assert catalog_path == (out / "tasks.json").resolve()
    assert TaskCatalog.load(catalog_path) == CATALOG  # the full catalog, ids unchanged
    assert len(train) + len(val) == 12
    for items in (train, val):
        assert all(set(it) == {"image", "label", "task"} and Path(it["image"]).is_absolute() for it in items)
    per_task = Counter(it["task"] for it in val)
    assert per_task == {"organ_ct": 1, "lesion_petct": 1, "head_us": 1}  # round(0.25 * n), at least 1
    assert not {it["image"] for it in train} & {it["image"] for it in val}
    # seeded: the same split again, another with a different seed
    again = json.loads(prepare(collection, CATALOG, tmp_path / "again", val_fraction=0.25, seed=3).read_text())
    assert again["validation"] == json.loads(path.read_text())["validation"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_prepare_explicit_mapping_and_select(tmp_path):
    folder = make_msd(tmp_path / "data", "SomeUS", 1, dims=2)
    path = prepare(folder, CATALOG, tmp_path / "out", tasks={"SomeUS": "head_us"}, select_present=True)
    train, val, catalog_path = load_datalist(path)
    assert len(train) == 1 and val == []  # a single case stays in training
    sub = TaskCatalog.load(catalog_path)
    assert sub.names == ["head_us"] and sub["head_us"].id == 0


def test_prepare_unmapped_folder(tmp_path):
    folder = make_msd(tmp_path / "data", "Unknown07", 1)
    with pytest.raises(ValueError, match=r"Unknown07.*no task.*'Test01_CT'"):
        prepare(folder, CATALOG, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_reports_every_problem_and_writes_nothing(collection, tmp_path):
    ct, petct, us = collection
    (ct / "imagesTr" / "case_001.nii.gz").unlink()  # missing file
    gz = ct / "imagesTr" / "case_002.nii.gz"
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])  # truncated gzip
    lab = np.zeros((20, 18, 14), np.uint8)
    lab[0, 0, 0] = 7
    aff3 = np.diag([2.0, 2.0, 2.0, 1.0])  # the grid make_msd uses for 3D cases
    nib.save(nib.Nifti1Image(lab, aff3), str(ct / "labelsTr" / "case_003.nii.gz"))  # label out of range
    img = np.zeros((20, 18, 14, 3), np.float32)
    nib.save(nib.Nifti1Image(img, aff3), str(petct / "imagesTr" / "case_000.nii.gz"))  # 3 channels, not 2
    lab = np.zeros((20, 18, 14), np.uint8)
    nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.5, 1.0])), str(petct / "labelsTr" / "case_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((30, 25), np.uint8), np.eye(4)), str(us / "labelsTr" / "case_001.nii.gz"))
    img = np.zeros((30, 26, 5), np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(us / "imagesTr" / "case_002.nii.gz"))  # 3D image, 2D task
    img = np.zeros((20, 18, 14), np.float32)
    img[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(img, aff3), str(ct / "imagesTr" / "case_004.nii.gz"))  # NaN
    out = tmp_path / "prepared"
    with pytest.raises(ValueError) as e:
        prepare(collection, CATALOG, out)
    msg = str(e.value)
    expected = [
        r"Test01_CT/imagesTr/case_001\.nii\.gz \(task 'organ_ct'\): image file does not exist",
        r"Test01_CT/imagesTr/case_002\.nii\.gz \(task 'organ_ct'\): image cannot be read",
        r"Test01_CT/labelsTr/case_003\.nii\.gz \(task 'organ_ct'\): label values must be in \[0, 3\).*\[0, 7\]",
        r"Test01_CT/imagesTr/case_004\.nii\.gz \(task 'organ_ct'\): the image contains 1 NaN",
        r"Test02_PETCT/imagesTr/case_000\.nii\.gz \(task 'lesion_petct'\): expected 2 channel\(s\).*got 3",
        r"Test02_PETCT/labelsTr/case_001\.nii\.gz \(task 'lesion_petct'\): the label's affine .* differs",
        r"Test03_US2D/labelsTr/case_001\.nii\.gz \(task 'head_us'\): label shape \(30, 25\) does not match.*\(30, 26\)",
        r"Test03_US2D/imagesTr/case_002\.nii\.gz \(task 'head_us'\): expected a 2D image",
    ]
    for pattern in expected:
        assert re.search(pattern, msg), (pattern, msg)
    assert msg.startswith(f"prepare found {len(expected)} problem(s)")
    assert not out.exists()


def test_prepare_arguments(collection, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(collection, CATALOG, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(ValueError, match="already given"):
        prepare([collection[0], collection[0]], CATALOG, tmp_path / "o")
    with pytest.raises(ValueError, match=r"\['Test01_Typo'\] that are not among"):
        prepare(collection, CATALOG, tmp_path / "o", tasks={"Test01_Typo": "organ_ct"})
    assert not (tmp_path / "o").exists()


def test_load_datalist_relative_paths(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz", "task": 0}]}))
    train, val, cat = load_datalist(tmp_path / "dl.json")
    assert train[0]["image"] == str(tmp_path.resolve() / "a.nii.gz") and val == [] and cat is None
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_datalist(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- sampler
TASK_IDS = [0] * 7 + [1] * 2 + [3] * 5  # task 2 has no items


def test_sampler_single_task_batches_and_quota():
    s = TaskBalancedBatchSampler(TASK_IDS, batch_size=3, batches_per_task=10, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 30 and s.tasks == [0, 1, 3]
    counts = Counter()
    for b in batches:
        assert len(b) == 3
        tasks = {TASK_IDS[i] for i in b}
        assert len(tasks) == 1
        counts[tasks.pop()] += 1
    assert counts == {0: 10, 1: 10, 3: 10}
    first = [TASK_IDS[b[0]] for b in batches]
    assert first != sorted(first)  # task order shuffled


def test_sampler_determinism_and_epochs():
    a = TaskBalancedBatchSampler(TASK_IDS, 2, 5, seed=4)
    b = TaskBalancedBatchSampler(TASK_IDS, 2, 5, seed=4)
    assert list(a) == list(b) and list(a) == list(a)
    assert list(TaskBalancedBatchSampler(TASK_IDS, 2, 5, seed=5)) != list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)


def test_sampler_distributed_split():
    full = TaskBalancedBatchSampler(TASK_IDS, 2, batches_per_task=5, seed=0, num_replicas=1, rank=0)
    ranks = [TaskBalancedBatchSampler(TASK_IDS, 2, batches_per_task=5, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert len(r0) == len(r1) == len(ranks[0]) == 8  # 15 batches -> padded to 16
    assert r0 != r1
    # together the ranks see the whole epoch (plus one wrapped batch)
    assert sorted(map(tuple, r0 + r1[:-1])) == sorted(map(tuple, list(full)))
    assert r1[-1] == list(full)[0]


def test_sampler_argument_checks():
    with pytest.raises(ValueError, match="batch_size"):
        TaskBalancedBatchSampler(TASK_IDS, 0)
    with pytest.raises(ValueError, match="empty"):
        TaskBalancedBatchSampler([], 2)
    with pytest.raises(ValueError, match="rank"):
        TaskBalancedBatchSampler(TASK_IDS, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batches_per_task"):
        TaskBalancedBatchSampler(TASK_IDS, 2, batches_per_task=0)
    with pytest.raises(ValueError, match="num_replicas"):
        TaskBalancedBatchSampler(TASK_IDS, 2, num_replicas=0, rank=0)


def test_sampler_with_dataloader_and_train_transforms(collection, tmp_path):
    train, val, catalog_path = load_datalist(prepare(collection, CATALOG, tmp_path / "prep", val_fraction=0.0))
    catalog = TaskCatalog.load(catalog_path)
    sampler = TaskBalancedBatchSampler.from_items(train, catalog, batch_size=2, batches_per_task=2, seed=0)
    ds = Dataset(train, train_transforms(catalog, augment=False))
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=1)
    seen = Counter()
    for batch in loader:
        task = catalog[batch["task"][0]]
        assert batch["task"] == [task.name] * 2 and batch["task_id"].tolist() == [task.id] * 2
        assert tuple(batch["image"].shape) == (2, task.num_channels, *task.patch_size)
        assert tuple(batch["label"].shape) == (2, 1, *task.patch_size)
        assert batch["image"].dtype == torch.float32
        seen[task.name] += 1
    assert seen == {"organ_ct": 2, "lesion_petct": 2, "head_us": 2}


def test_sampler_foreground_positions_follow_nnunets_rule():
    """nnU-Net v1 (UniSeg): positions j >= round(B * (1 - 0.33)) are forced: 1 of 2, 1 of 3, 1 of 4, 2 of 6."""

    def flags(b):
        return TaskBalancedBatchSampler(TASK_IDS, b, oversample_foreground=0.33).foreground_flags()

    flags = {b: flags(b) for b in (1, 2, 3, 4, 6)}
    assert flags == {1: [False], 2: [False, True], 3: [False, False, True], 4: [False, False, False, True],
                     6: [False] * 4 + [True] * 2}  # fmt: skip
    plain = TaskBalancedBatchSampler(TASK_IDS, 2, batches_per_task=3)
    pairs = TaskBalancedBatchSampler(TASK_IDS, 2, batches_per_task=3, oversample_foreground=0.33)
    assert [[i for i, _ in b] for b in pairs] == list(plain)  # same draws, flags added
    assert all([f for _, f in b] == [False, True] for b in pairs)
    with pytest.raises(ValueError, match="oversample_foreground"):
        TaskBalancedBatchSampler(TASK_IDS, 2, oversample_foreground=1.5)


def test_measured_foreground_rate_matches_the_rule(tmp_path):
    """Through the bundles' dataset (cached_dataset -> PatchDataset) and a DataLoader: every forced position holds
    foreground, the free one only by chance, so the measured rate is 1/2 plus a little at batch size 2."""
    from conftest import task_dict
    from monai.data import MetaTensor

    from uniseg_components.data import PatchDataset, cached_dataset
    from uniseg_components.transforms import TaskRandCropd

    catalog = TaskCatalog([task_dict("tiny", 0, dims=2, modalities=["US"], patch=(16, 16))])
    items = []
    for k in range(4):
        lab = torch.zeros(1, 96, 96)
        lab[0, 10 + 15 * k : 12 + 15 * k, 40:42] = 1
        items.append({"image": MetaTensor(torch.rand(1, 96, 96)), "label": MetaTensor(lab), "task": "tiny"})
    ds = cached_dataset(items, Compose([Identityd(["image", "label"]), TaskRandCropd(catalog=catalog)]))
    assert isinstance(ds, PatchDataset) and isinstance(ds.dataset, CacheDataset) and ds.data == items
    ds.transform.set_random_state(0)
    sampler = TaskBalancedBatchSampler.from_items(items, catalog, 2, batches_per_task=300, oversample_foreground=0.33)
    hits = np.asarray([[bool(lab.sum() > 0) for lab in b["label"]] for b in DataLoader(ds, batch_sampler=sampler)])
    assert hits.shape == (300, 2) and hits[:, 1].all()
    assert hits[:, 0].mean() < 0.1  # 2x2 foreground in 96x96: a free 16x16 patch holds it ~5% of the time
    assert 0.5 <= hits.mean() < 0.55


def test_sampler_frequencies_follow_the_task_weights():
    """Hermes' dataset-weighted sampling: a task's share is weight x cases (normalised), in mixed batches (each
    batch from one stackable group) and in single-task batches."""
    ids = [0] * 10 + [1] * 20 + [2] * 30 + [3] * 5
    weights = {0: 1.0, 1: 2.0, 2: 0.5, 3: 4.0}
    expected = np.asarray([10, 40, 15, 20]) / 85
    groups = {0: "a", 1: "a", 2: "a", 3: "b"}
    for mix in (True, False):
        s = TaskBalancedBatchSampler(ids, 4, batches_per_task=1000, mix_tasks=mix, groups=groups, weights=weights)
        assert np.allclose([s.shares()[t] for t in range(4)], expected)
        batches = s.global_batches()
        tasks = np.asarray(ids)[np.asarray(batches)]
        assert len(batches) == 4000
        freq = np.bincount(tasks.ravel(), minlength=4) / tasks.size
        assert np.abs(freq - expected).max() < 0.02, freq
        assert all(len({groups[t] for t in row}) == 1 for row in tasks.tolist())  # stackable batches only
        if mix:
            assert np.mean([len(set(row)) > 1 for row in tasks.tolist()]) > 0.5  # batches do mix tasks
        else:
            assert all(len(set(row)) == 1 for row in tasks.tolist())
    s = TaskBalancedBatchSampler(ids, 2)
    assert np.allclose(list(s.shares().values()), 0.25)  # task-balanced without weights
    with pytest.raises(ValueError, match="no entry for task id"):
        TaskBalancedBatchSampler(ids, 2, weights={0: 1.0})
    with pytest.raises(ValueError, match="positive"):
        TaskBalancedBatchSampler(ids, 2, weights={0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0})


def test_prepare_with_one_split_file_for_all_folders(collection, tmp_path, caplog):
    """One split file covering the cases of every folder (UniSeg's merged dataset): each folder's cases follow it,
    and no folder is told that the other folders' cases are missing from the data."""
    import logging

    ct, petct, _ = collection
    (tmp_path / "split.json").write_text(json.dumps([{"train": ["case_001", "case_002", "case_003", "case_004"],
                                                      "val": ["case_000"]}]))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        d = json.loads(prepare([ct, petct], CATALOG, tmp_path / "out", split=tmp_path / "split.json").read_text())
    assert sorted((it["task"], Path(it["image"]).name) for it in d["validation"]) == [
        ("lesion_petct", "case_000.nii.gz"), ("organ_ct", "case_000.nii.gz")
    ]  # fmt: skip
    assert "not in the data" not in caplog.text


def test_prepare_with_nnunet_split_files_json_and_pkl(collection, tmp_path):
    """`prepare --split`: nnU-Net v2's splits_final.json and v1's (UniSeg's) splits_final.pkl decide the validation
    cases of the fold; one file per folder; errors name the file and the fold; a pickle runs no foreign code."""
    import pickle
    from collections import OrderedDict

    from uniseg_components.data import read_split

    ct, petct, us = collection
    v2 = [{"train": ["case_001", "case_002", "case_003", "case_004"], "val": ["case_000"]},
          {"train": ["case_000", "case_002", "case_003", "case_004"], "val": ["case_001"]}]  # fmt: skip
    (tmp_path / "splits_final.json").write_text(json.dumps(v2))
    v1 = [OrderedDict(train=np.array(["case_000"]), val=np.array(["case_001", "case_002"])) for _ in range(5)]
    with open(tmp_path / "splits_final.pkl", "wb") as f:
        pickle.dump(v1, f)
    split = {ct.name: tmp_path / "splits_final.json", petct.name: tmp_path / "splits_final.pkl"}
    d = json.loads(prepare(collection, CATALOG, tmp_path / "out", split=split, fold=1).read_text())
    val = sorted((it["task"], Path(it["image"]).name) for it in d["validation"] if it["task"] != "head_us")
    assert val == [("lesion_petct", "case_001.nii.gz"), ("lesion_petct", "case_002.nii.gz"),
                       ("organ_ct", "case_001.nii.gz")]  # fmt: skip
    assert sum(it["task"] == "head_us" for it in d["validation"]) == 1  # no split file: the seeded split
    assert len(d["training"]) + len(d["validation"]) == 12
    assert read_split(tmp_path / "splits_final.pkl", 4)["val"] == {"case_001", "case_002"}
    # a case in both lists (the authors' 11-task split has two) is used for both, as nnU-Net does
    v2[0]["train"].append("case_000")
    (tmp_path / "splits_final.json").write_text(json.dumps(v2))
    d = json.loads(prepare([ct], CATALOG, tmp_path / "both", split=tmp_path / "splits_final.json").read_text())
    names = [[Path(it["image"]).name for it in d[k]] for k in ("training", "validation")]
    assert names == [[f"case_00{i}.nii.gz" for i in range(5)], ["case_000.nii.gz"]]

    with pytest.raises(ValueError, match=r"splits_final.json' has 2 fold\(s\) \(0-1\); fold 2"):
        prepare(collection, CATALOG, tmp_path / "x", split=split, fold=2)
    with pytest.raises(ValueError, match=r"1 case\(s\) are in neither .*Test02_PETCT/case_002"):
        v1[0]["val"] = np.array(["case_001"])
        with open(tmp_path / "splits_final.pkl", "wb") as f:
            pickle.dump(v1, f)
        prepare(collection, CATALOG, tmp_path / "x", split=split, fold=0)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump([{"train": [], "val": [], "run": Path}], f)  # names a class: not what a split file holds
    with pytest.raises(ValueError, match="pathlib.*is not part of an nnU-Net split file"):
        read_split(tmp_path / "evil.pkl")
    assert not (tmp_path / "x").exists()


def test_split_by_case_prefix_script(tmp_path):
    """scripts/split_by_case_prefix.py: the authors' merged MOTS-style nnU-Net v1 raw folder (cases told apart by
    their first four characters) becomes one linked folder per task, which prepare reads with the case names (so an
    nnU-Net split file matches); a case without a prefix stops it before anything is written."""
    import importlib.util

    from conftest import task_dict

    spec = importlib.util.spec_from_file_location(
        "split_script", Path(__file__).parents[1] / "scripts/split_by_case_prefix.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = make_msd(tmp_path / "raw", "Task091_MOTS", 5, num_classes=3, seed=4)
    meta = json.loads((src / "dataset.json").read_text())
    names = ["live_0000", "live_0001", "kidn_0000", "kidn_0001", "kidn_0002"]
    for i, name in enumerate(names):  # nnU-Net v1 layout: listed x.nii.gz, stored x_0000.nii.gz
        (src / "imagesTr" / f"case_{i:03d}.nii.gz").rename(src / "imagesTr" / f"{name}_0000.nii.gz")
        (src / "labelsTr" / f"case_{i:03d}.nii.gz").rename(src / "labelsTr" / f"{name}.nii.gz")
        meta["training"][i] = {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
    (src / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "split"
    assert script.main([str(src), "--out", str(out), "--map", "live=MOTS_liver"]) == 1 and not out.exists()
    assert script.main([str(src), "--out", str(out), "--map", "live=MOTS_liver,kidn=MOTS_kidney"]) == 0
    assert sorted(p.name for p in (out / "MOTS_kidney" / "imagesTr").iterdir()) == [
        f"{n}_0000.nii.gz" for n in names[2:]
    ]
    assert (out / "MOTS_liver" / "labelsTr" / "live_0001.nii.gz").is_symlink()
    catalog = TaskCatalog(
        [
            task_dict(name, i, ["background", name, "tumour"], dataset=f"MOTS_{name}", spacing=(2, 2, 2))
            for i, name in enumerate(("liver", "kidney"))
        ]
    )
    (tmp_path / "split.json").write_text(json.dumps([{"train": ["live_0000", "kidn_0000", "kidn_0001"],
                                                      "val": ["live_0001", "kidn_0002"]}]))  # fmt: skip
    dl = prepare([out / "MOTS_liver", out / "MOTS_kidney"], catalog, tmp_path / "prep", split=tmp_path / "split.json")
    train, val, _ = load_datalist(dl)
    assert sorted((it["task"], case_id(it)) for it in val) == [("kidney", "kidn_0002"), ("liver", "live_0001")]
    assert len(train) == 3
    assert script.main([str(src), "--out", str(out), "--map", "live=MOTS_liver,kidn=MOTS_kidney"]) == 1  # not empty


def test_split_by_case_prefix_refuses_missing_files_and_a_file_as_target(tmp_path):
    """A case whose label is missing, or a target that is a file, stops the split before anything is written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "split_script", Path(__file__).parents[1] / "scripts/split_by_case_prefix.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = make_msd(tmp_path / "raw", "Task091_MOTS", 2, seed=5)
    meta = json.loads((src / "dataset.json").read_text())
    for i, name in enumerate(["live_0000", "kidn_0000"]):
        (src / "imagesTr" / f"case_{i:03d}.nii.gz").rename(src / "imagesTr" / f"{name}_0000.nii.gz")
        (src / "labelsTr" / f"case_{i:03d}.nii.gz").rename(src / "labelsTr" / f"{name}.nii.gz")
        meta["training"][i] = {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
    (src / "dataset.json").write_text(json.dumps(meta))
    mapping = {"live": "MOTS_liver", "kidn": "MOTS_kidney"}
    (src / "labelsTr" / "kidn_0000.nii.gz").rename(tmp_path / "away.nii.gz")
    with pytest.raises(ValueError, match="kidn_0000: no labelsTr"):
        script.split(src, tmp_path / "out", mapping)
    assert not (tmp_path / "out").exists()
    (tmp_path / "away.nii.gz").rename(src / "labelsTr" / "kidn_0000.nii.gz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "MOTS_liver").write_text("not a folder")
    with pytest.raises(ValueError, match="not empty folders"):
        script.split(src, tmp_path / "out", mapping)
    assert script.split(src, tmp_path / "out2", mapping) == {"MOTS_liver": 1, "MOTS_kidney": 1}

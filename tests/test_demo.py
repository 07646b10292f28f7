# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the synthetic demo collection writer (``uniseg_components.demo``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import EnsureChannelFirst, LoadImage

from uniseg_components import demo
from uniseg_components.demo import DEFAULT_NUM_CASES, demo_collection_exists, write_demo_collection
from uniseg_components.tasks import TaskCatalog

HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
needs_nilearn = pytest.mark.skipif(not HAS_NILEARN, reason="nilearn (the demo extra) is not installed")
#: tasks written by the module's collection: all of them, less brain_mr when nilearn is missing
TASKS = None if HAS_NILEARN else ["abdomen_ct", "lesion_petct", "fetal_us", "chest_xr", "skin_lesion"]

LOAD = LoadImage(image_only=True)
CHANNEL_FIRST = EnsureChannelFirst()


def _load(path: Path) -> np.ndarray:
    """Channel-first array of a file; a trailing singleton axis of a 2D multi-channel file is squeezed."""
    arr = CHANNEL_FIRST(LOAD(str(path)))
    if arr.ndim == 4 and arr.shape[-1] == 1:  # 2D RGB stored as (X, Y, 1, C)
        arr = arr[..., 0]
    return np.asarray(arr)


def _best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """The best Dice of ``image < t`` or ``image > t`` with ``mask`` over 99 quantile thresholds."""
    best = 0.0
    for t in np.quantile(image, np.linspace(0.01, 0.99, 99)):
        for pred in (image < t, image > t):
            best = max(best, 2.0 * float((pred & mask).sum()) / float(pred.sum() + mask.sum()))
    return best


def _cases(root: Path, dataset: str) -> list[tuple[Path, Path]]:
    meta = json.loads((root / dataset / "dataset.json").read_text())
    return [(root / dataset / e["image"], root / dataset / e["label"]) for e in meta["training"]]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full default collection, written once for the module."""
    return write_demo_collection(tmp_path_factory.mktemp("demo") / "collection", seed=0, tasks=TASKS)


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    cat = TaskCatalog.builtin(demo.DEMO_CATALOG)
    return cat if TASKS is None else cat.select(names=TASKS)


def test_layout_and_tasks_json(collection: Path, catalog: TaskCatalog) -> None:
    saved = TaskCatalog.load(collection / demo.DEMO_TASKS_FILE)
    assert saved.to_dict() == catalog.to_dict()
    assert sorted(p.name for p in collection.iterdir()) == sorted([demo.DEMO_TASKS_FILE] + [t.dataset for t in saved])
    assert demo_collection_exists(collection, saved.names)
    for t in saved:
        meta = json.loads((collection / t.dataset / "dataset.json").read_text())
        assert meta["name"] == t.dataset
        assert meta["tensorImageSize"] == ("4D" if t.num_channels > 1 else f"{t.dims}D")
        assert meta["modality"] == {str(i): m for i, m in enumerate(t.modalities)}
        assert meta["labels"] == {str(i): c for i, c in enumerate(t.labels)}
        assert meta["numTraining"] == len(meta["training"]) == DEFAULT_NUM_CASES[t.name]
        for entry in meta["training"]:
            assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
            assert Path(entry["image"]).name == Path(entry["label"]).name
            assert (collection / t.dataset / entry["image"]).is_file()
            assert (collection / t.dataset / entry["label"]).is_file()
    # nothing left over next to the collection
    assert [p.name for p in collection.parent.iterdir()] == [collection.name]


def test_images_load_with_monai(collection: Path, catalog: TaskCatalog) -> None:
    for t in catalog:
        seen: set[int] = set()
        for img_path, lab_path in _cases(collection, t.dataset):
            img = CHANNEL_FIRST(LOAD(str(img_path)))
            lab = CHANNEL_FIRST(LOAD(str(lab_path)))
            if t.dims == 2 and img.ndim == 4:  # 2D multi-channel: (X, Y, 1, C) on disk
                assert img.shape[-1] == 1, (t.name, img.shape)
                img = img[..., 0]
            assert img.shape[0] == t.num_channels and img.ndim == t.dims + 1, (t.name, img.shape)
            assert lab.shape[0] == 1 and lab.shape[1:] == img.shape[1:]
            # spacing near the target (per-case variation of at most 20%), diagonal RAS affine
            spacing = np.asarray(img.pixdim[: t.dims], dtype=float)
            assert np.all(np.abs(spacing / np.asarray(t.spacing) - 1) <= 0.21), (t.name, spacing)
            assert min(img.shape[1:]) >= 48
            values = np.unique(np.asarray(lab)).astype(int)
            assert set(values.tolist()) <= set(range(t.num_classes)), (t.name, values)
            seen |= set(values.tolist())
        assert seen == set(range(t.num_classes)), f"{t.name}: classes {seen}"


def test_files_dtypes(collection: Path, catalog: TaskCatalog) -> None:
    import nibabel as nib

    for t in catalog:
        img_path, lab_path = _cases(collection, t.dataset)[0]
        img, lab = nib.load(str(img_path)), nib.load(str(lab_path))
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        # channel last for multi-channel images; 2D ones keep nnU-Net's singleton third axis: (X, Y, 1, C)
        channels = ((1,) if t.dims == 2 else ()) + (t.num_channels,) if t.num_channels > 1 else ()
        expected = img.shape[: t.dims] + channels
        assert img.shape == expected and lab.shape == img.shape[: t.dims]
        assert np.allclose(img.affine[:3, :3], np.diag(np.diag(img.affine[:3, :3])))
        assert np.all(np.diag(img.affine)[: t.dims] > 0)
        assert np.allclose(img.affine, lab.affine)


def test_abdomen_ct_intensities(collection: Path) -> None:
    organ, tumour = [], []
    for img_path, lab_path in _cases(collection, "Demo01_AbdomenCT"):
        img, lab = _load(img_path)[0], _load(lab_path)[0]
        assert -1030 <= img.min() <= -950 and img.max() >= 400  # air and bone
        assert np.array_equal(img, np.rint(img))  # integer HU
        organ.append(img[lab == 1].mean())
        assert (lab == 2).any(), f"{lab_path}: every demo CT case has a tumour"
        tumour.append(img[lab == 2].mean())
        assert tumour[-1] < organ[-1] - 40  # clearly hypodense
    assert all(30 <= m <= 90 for m in organ), organ
    assert all(-30 <= m <= 20 for m in tumour), tumour


def test_lesion_petct_intensities(collection: Path) -> None:
    for img_path, lab_path in _cases(collection, "Demo03_LesionPETCT"):
        img, lab = _load(img_path), _load(lab_path)[0]
        ct, pet = img[0], img[1]
        assert -1030 <= ct.min() <= -950 and ct.max() < 3100
        assert pet.min() >= 0 and pet.max() < 40
        assert (lab == 1).any()
        body = (ct > -500) & (lab == 0)
        assert pet[lab == 1].mean() > 2 * pet[body].mean()


def test_kidney_ct_held_out_task(tmp_path: Path) -> None:
    """``demo_new_tasks``: kidney_ct comes from the abdomen_ct generator with other organs annotated, and only
    when that catalog is asked for."""
    from uniseg_components.cli import demo_data

    out = Path(demo_data(str(tmp_path / "new"), catalog="demo_new_tasks"))  # the CLI verb: demo-data --catalog ...
    saved = TaskCatalog.load(out / demo.DEMO_TASKS_FILE)
    assert saved.name == "demo_new_tasks" and saved.names == ["kidney_ct"] and saved["kidney_ct"].id == 0
    assert saved.plan == TaskCatalog.builtin(demo.DEMO_CATALOG).plan  # same plan: an upstream demo model can take it
    assert "kidney_ct" not in TaskCatalog.builtin(demo.DEMO_CATALOG).names
    assert sorted(p.name for p in out.iterdir()) == ["Demo07_KidneyCT", "tasks.json"]
    for img_path, lab_path in _cases(out, "Demo07_KidneyCT"):
        img, lab = _load(img_path)[0], _load(lab_path)[0]
        kidney, spleen = lab == 1, lab == 2
        assert set(np.unique(lab).astype(int).tolist()) == {0, 1, 2}
        assert -1030 <= img.min() <= -950 and np.array_equal(img, np.rint(img))
        # enhancing organs far brighter than fat; nephrographic phase: the kidneys brighter than the spleen
        fat = img[(img > -150) & (img < -60)].mean()
        assert img[spleen].mean() > fat + 150 and img[kidney].mean() > img[spleen].mean() + 15
        # two kidneys on either side of the midline, the spleen on the patient's left (-x, low array index)
        xs = np.nonzero(kidney)[0]
        mid = img.shape[0] / 2
        assert (xs < mid).any() and (xs > mid).any()
        assert np.nonzero(spleen)[0].mean() < mid
    with pytest.raises(ValueError, match="no demo generator"):
        write_demo_collection(tmp_path / "x", catalog="uniseg_11tasks", tasks=["liver"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


@needs_nilearn
def test_brain_mr_tissues(collection: Path) -> None:
    for img_path, lab_path in _cases(collection, "Demo02_BrainMR"):
        img, lab = _load(img_path)[0], _load(lab_path)[0]
        brain = lab > 0
        assert set(np.unique(lab).astype(int).tolist()) == {0, 1, 2, 3}
        frac = [(lab == c).sum() / brain.sum() for c in (1, 2, 3)]
        assert frac[0] > 0.01 and frac[1] > 0.1 and frac[2] > 0.1, frac
        assert 0.05 < brain.mean() < 0.6
        mean = [img[lab == c].mean() for c in range(4)]
        assert mean[0] < mean[1] < mean[2] < mean[3]  # T1 contrast: background < CSF < GM < WM


def test_fetal_us_2d(collection: Path) -> None:
    for img_path, lab_path in _cases(collection, "Demo04_FetalUS2D"):
        img, lab = _load(img_path), _load(lab_path)
        assert img.shape[0] == 1 and img.ndim == 3 and lab.shape == img.shape
        head = lab[0] == 1
        assert 0.03 < head.mean() < 0.5
        assert (img[0][head] > 0).all()  # the head lies inside the ultrasound sector
        assert not head[0].any() and not head[-1].any() and not head[:, 0].any() and not head[:, -1].any()


def test_chest_xr_2d(collection: Path) -> None:
    dice = []
    for img_path, lab_path in _cases(collection, "Demo05_ChestXR2D"):
        img, lab = _load(img_path), _load(lab_path)
        assert img.shape[0] == 1 and img.ndim == 3 and lab.shape == img.shape
        image, label = img[0], lab[0]
        assert 0 <= image.min() and image.max() <= 4095
        lungs, heart = label == 1, label == 2
        assert 0.1 < lungs.mean() < 0.45 and 0.02 < heart.mean() < 0.2
        # radiograph contrast: air-filled lungs darker than the heart; the air outside the body darker still
        assert image[lungs].mean() < image[heart].mean() - 300
        assert image[:5].mean() < image[lungs].mean()  # the image border beside the chest wall is air
        # both lungs present: lung pixels on each side of the midline
        mid = lungs.shape[0] // 2
        assert lungs[:mid].any() and lungs[mid:].any()
        dice.append([_best_threshold_dice(image, label == c) for c in (1, 2)])
    # not solvable by one intensity threshold (ribs, vessels, mediastinum and air overlap the classes)
    assert np.mean(dice, axis=0).max() < 0.8, dice


def test_skin_lesion_rgb(collection: Path) -> None:
    dice = []
    for img_path, lab_path in _cases(collection, "Demo06_SkinLesion2D"):
        img, lab = _load(img_path), _load(lab_path)
        assert img.shape[0] == 3 and img.ndim == 3 and lab.shape == (1, *img.shape[1:])
        assert 0 <= img.min() and img.max() <= 255
        lesion = lab[0] == 1
        assert 0.02 < lesion.mean() < 0.5
        assert not lesion[0].any() and not lesion[-1].any() and not lesion[:, 0].any() and not lesion[:, -1].any()
        skin = ~lesion & (img.mean(0) > 60)  # leave out hairs and the dark aperture corners
        # pigmented: darker than the skin around it in every channel, and skin is reddish (R > G > B)
        assert all(img[c][lesion].mean() < img[c][skin].mean() for c in range(3))
        assert img[0][skin].mean() > img[1][skin].mean() > img[2][skin].mean()
        dice.append(_best_threshold_dice(img.mean(0), lesion))
    assert np.mean(dice) < 0.8, dice


def test_new_2d_tasks_through_val_and_train_transforms(collection: Path, catalog: TaskCatalog) -> None:
    import torch

    from uniseg_components.transforms import train_transforms, val_transforms

    val, train = val_transforms(catalog), train_transforms(catalog, augment=False)
    for name, channels in (("chest_xr", 1), ("skin_lesion", 3)):
        t = catalog[name]
        img_path, lab_path = _cases(collection, t.dataset)[0]
        item = {"image": str(img_path), "label": str(lab_path), "task": name}
        out = val(item)
        image, label = out["image"], out["label"]
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == channels
        assert label.shape == (1, *image.shape[1:])
        assert np.allclose(image.pixdim[:2].tolist(), t.spacing)  # resampled to the task's spacing
        assert bool(torch.isfinite(image).all())
        flat = image.reshape(channels, -1)
        assert torch.allclose(flat.mean(1), torch.zeros(channels), atol=1e-4)  # z-scored per channel
        assert torch.allclose(flat.std(1, unbiased=False), torch.ones(channels), atol=1e-3)
        assert set(torch.unique(label).int().tolist()) == set(range(t.num_classes))
        patch = train(item)
        assert patch["image"].shape == (channels, *t.patch_size) and patch["label"].shape == (1, *t.patch_size)


@pytest.mark.parametrize("name", ["chest_xr", "skin_lesion"])
def test_new_2d_generators_reproducible(name: str) -> None:
    spec = TaskCatalog.builtin(demo.DEMO_CATALOG)[name]
    salt, gen = demo._GENERATORS[name]
    a = gen(np.random.default_rng([0, salt, 3]), spec, 3, {})
    b = gen(np.random.default_rng([0, salt, 3]), spec, 3, {})
    c = gen(np.random.default_rng([1, salt, 3]), spec, 3, {})
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    assert a[1].dtype == np.uint8 and set(np.unique(a[1]).tolist()) == set(range(spec.num_classes))
    assert a[0].shape[:2] == a[1].shape and a[0].shape[2:] == ((3,) if spec.num_channels == 3 else ())


def test_deterministic(collection: Path, tmp_path: Path) -> None:
    # case i does not depend on the number of cases: one case per task reproduces case 0 byte for byte
    same = write_demo_collection(tmp_path / "same", seed=0, num_cases=1, tasks=TASKS)
    files = _files(same)
    for t in TaskCatalog.load(same / demo.DEMO_TASKS_FILE):
        for img_path, lab_path in _cases(same, t.dataset):
            for p in (img_path, lab_path):
                assert p.read_bytes() == (collection / p.relative_to(same)).read_bytes(), p
    other = write_demo_collection(tmp_path / "other", seed=1, num_cases=1, tasks=TASKS)
    for name in _files(other):
        if name.endswith(".nii.gz") and "imagesTr" in name:
            assert not np.array_equal(_load(other / name), _load(same / name)), name
    assert sorted(files) == sorted(_files(other))


def test_idempotent_subset_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert write_demo_collection(out, tasks=["fetal_us"], num_cases=2) == out
    saved = TaskCatalog.load(out / "tasks.json")
    assert saved.names == ["fetal_us"] and saved["fetal_us"].id == 0
    assert sorted(p.name for p in out.iterdir()) == ["Demo04_FetalUS2D", "notes.txt", "tasks.json"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    before_bytes = _files(out)

    # a second run finds the collection and leaves it alone
    write_demo_collection(out, tasks=["fetal_us"], num_cases=2, seed=5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # overwrite regenerates (here with another seed)
    write_demo_collection(out, tasks=["fetal_us"], num_cases=2, seed=5, overwrite=True)
    after = _files(out)
    assert sorted(after) == sorted(before_bytes) and after != before_bytes
    assert (out / "notes.txt").read_text() == "keep me"

    # asking for more tasks than present writes them, keeping unrelated files
    write_demo_collection(out, tasks=["abdomen_ct", "fetal_us"], num_cases=1)
    saved = TaskCatalog.load(out / "tasks.json")
    assert saved.names == ["abdomen_ct", "fetal_us"]
    assert sorted(p.name for p in out.iterdir()) == ["Demo01_AbdomenCT", "Demo04_FetalUS2D", "notes.txt", "tasks.json"]
    assert demo_collection_exists(out) and not demo_collection_exists(out, ["brain_mr"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setitem(demo._GENERATORS, "fetal_us", (4, boom))
    with pytest.raises(RuntimeError, match="interrupted"):
        write_demo_collection(tmp_path / "c", tasks=["abdomen_ct", "fetal_us"], num_cases=1)
    assert list(tmp_path.iterdir()) == []


def test_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        write_demo_collection(tmp_path / "a", num_cases={"nope": 1})
    with pytest.raises(ValueError, match=">= 1"):
        write_demo_collection(tmp_path / "a", num_cases=0)
    with pytest.raises(ValueError, match="unknown task"):
        write_demo_collection(tmp_path / "a", tasks=["nope"])
    out = write_demo_collection(tmp_path / "b", tasks="fetal_us", num_cases={"fetal_us": 3})
    meta = json.loads((out / "Demo04_FetalUS2D" / "dataset.json").read_text())
    assert meta["numTraining"] == 3
    assert not (tmp_path / "a").exists()


def test_missing_nilearn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_find_nilearn", lambda: None)
    with pytest.raises(ImportError, match="pip install nilearn"):
        write_demo_collection(tmp_path / "c", tasks=["brain_mr"], num_cases=1)
    assert list(tmp_path.iterdir()) == []
    write_demo_collection(tmp_path / "d", tasks=["fetal_us"], num_cases=1)  # other tasks do not need nilearn


@needs_nilearn
def test_mni_files_match_nilearn_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The template files read directly equal what nilearn's public loaders return."""
    direct = demo._load_mni152()
    monkeypatch.setattr(demo, "_MNI_FILES", {k: "missing-" + v for k, v in demo._MNI_FILES.items()})
    via_api = demo._load_mni152()
    for k in ("t1", "gm", "wm"):
        np.testing.assert_allclose(direct[k], via_api[k], atol=1e-6)
    np.testing.assert_allclose(direct["affine"], via_api["affine"])

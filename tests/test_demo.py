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
TASKS = None if HAS_NILEARN else ["abdomen_ct", "lesion_petct", "fetal_us"]

LOAD = LoadImage(image_only=True)
CHANNEL_FIRST = EnsureChannelFirst()


def _load(path: Path) -> np.ndarray:
    return np.asarray(CHANNEL_FIRST(LOAD(str(path))))


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
        expected = img.shape[: t.dims] + ((t.num_channels,) if t.num_channels > 1 else ())
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

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Behavioural tests of uniseg_components.transforms on tiny synthetic NIfTI files (CPU, a few seconds)."""

from __future__ import annotations

import copy
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import mixed_catalog, task_dict
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged

from uniseg_components import transforms as T
from uniseg_components.tasks import TaskCatalog, UnknownTaskError

CATALOG = mixed_catalog(ct_spacing=(2.0, 2.0, 3.0), petct_spacing=(3.0, 3.0, 3.0), petct_patch=(16, 16, 16))


def save(path, array, affine=None):
    """Write a NIfTI file; ``affine`` default: 1.5 x 1.5 x 2.5 mm, LPS-flipped x and y (not RAS)."""
    if affine is None:
        affine = np.diag([-1.5, -1.5, 2.5, 1.0])
        affine[:3, 3] = [20.0, 10.0, -5.0]
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def blob_label(shape, centre, radius, value=1):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    lab = np.zeros(shape, np.uint8)
    lab[dist <= radius] = value
    return lab


@pytest.fixture()
def ct_case(tmp_path):
    rng = np.random.default_rng(0)
    shape = (30, 26, 20)
    img = rng.normal(0, 300, shape).astype(np.float32)
    lab = blob_label(shape, (15, 13, 10), 5)
    lab[14:16, 12:14, 9:11] = 2
    return (
        {
            "image": save(tmp_path / "ct_001.nii.gz", img),
            "label": save(tmp_path / "ct_001_seg.nii.gz", lab),
            "task": "organ_ct",
        },
        img,
        lab,
    )


@pytest.fixture()
def petct_case(tmp_path):
    rng = np.random.default_rng(1)
    shape = (24, 22, 18)
    img = np.stack([rng.normal(0, 300, shape), rng.gamma(2.0, 3.0, shape)], -1).astype(np.float32)  # (X, Y, Z, 2)
    lab = blob_label(shape, (12, 11, 9), 5)
    return (
        {
            "image": save(tmp_path / "petct_001.nii.gz", img),
            "label": save(tmp_path / "petct_001_seg.nii.gz", lab),
            "task": 1,
        },
        img,
        lab,
    )


@pytest.fixture()
def us_case(tmp_path):
    rng = np.random.default_rng(2)
    shape = (40, 34)
    img = rng.normal(50, 10, shape).astype(np.float32)
    lab = blob_label(shape, (20, 17), 6)
    aff = np.diag([0.8, -0.8, 1.0, 1.0])
    return (
        {
            "image": save(tmp_path / "us_001.nii.gz", img, aff),
            "label": save(tmp_path / "us_001_seg.nii.gz", lab, aff),
            "task": "2",
        },
        img,
        lab,
    )


# ---------------------------------------------------------------------------------------------- normalisation
def test_normalize_ct_window():
    x = MetaTensor(torch.tensor([[-1000.0, -325.0, 0.0, 325.0, 1000.0]]))
    out = T.NormalizeModalityd("image", CATALOG)({"image": x, "task": "organ_ct"})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)


def test_normalize_zscore_and_mixed_channels():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (8, 8, 8))
    pet = rng.gamma(2.0, 5.0, (8, 8, 8)) + 100
    x = MetaTensor(torch.as_tensor(np.stack([ct, pet]), dtype=torch.float32))
    out = T.NormalizeModalityd("image", CATALOG)({"image": x, "task": "lesion_petct"})["image"]
    assert out.shape == x.shape
    assert float(out[0].min()) >= 0.0 and float(out[0].max()) <= 1.0  # CT window
    np.testing.assert_allclose(out[0].numpy(), (np.clip(ct, -325, 325) + 325) / 650, atol=1e-5)
    assert abs(float(out[1].mean())) < 1e-4 and abs(float(out[1].std(unbiased=False)) - 1) < 1e-4  # PET z-score
    # a constant channel stays finite (std clamped by eps)
    const = T.NormalizeModalityd("image", CATALOG)({"image": torch.full((1, 4, 4), 7.0), "task": "head_us"})["image"]
    assert torch.isfinite(const).all() and float(const.abs().max()) == 0.0


def test_normalize_wrong_channels():
    with pytest.raises(ValueError, match="lesion_petct.*2 channel"):
        T.NormalizeModalityd("image", CATALOG)({"image": torch.zeros(1, 4, 4, 4), "task": "lesion_petct"})


# ---------------------------------------------------------------------------------------------- task, checks
def test_attach_task_resolves_names_and_ids():
    attach = T.AttachTaskd(CATALOG)
    for key in ("lesion_petct", 1, "1", np.int64(1), torch.tensor(1)):
        d = attach({"image": "x.nii.gz", "task": key})
        assert d["task"] == "lesion_petct" and d["task_id"] == 1 and isinstance(d["task_id"], int)
    assert T.AttachTaskd(CATALOG, default="head_us")({"image": "x.nii.gz"})["task_id"] == 2


def test_attach_task_unknown():
    with pytest.raises(UnknownTaskError) as e:
        T.AttachTaskd(CATALOG)({"image": "/data/case_7.nii.gz", "task": "spleen"})
    msg = str(e.value)
    assert "case_7.nii.gz" in msg and "spleen" in msg and "organ_ct" in msg and "head_us" in msg
    with pytest.raises(UnknownTaskError, match="case_8.nii.gz.*no 'task' key"):
        T.AttachTaskd(CATALOG)({"image": "/data/case_8.nii.gz"})


def _load_and_check(item):
    """The loading and checking steps, applied one by one (a ``Compose`` would wrap errors in RuntimeError)."""
    d = item
    for t in (
        T.AttachTaskd(CATALOG),
        LoadImaged(["image", "label"], image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
        T.Squeeze2Dd(["image", "label"], CATALOG, allow_missing_keys=True),
        T.CheckTaskInputd(CATALOG),
    ):
        d = t(d)
    return d


def test_check_task_input_accepts_good_items(ct_case, petct_case, us_case):
    for item, img, _ in (ct_case, petct_case, us_case):
        d = _load_and_check(item)
        assert d["image"].shape[1:] == d["label"].shape[1:]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("channels", r"bad_channels\.nii\.gz.*lesion_petct.*2 input channel.*got 1"),
        ("2d_for_3d", r"bad_2d\.nii\.gz.*organ_ct.*3D image.*got a 2D image"),
        ("3d_for_2d", r"bad_3d\.nii\.gz.*head_us.*2D image.*got a 3D image"),
        ("label_range", r"bad_range_seg\.nii\.gz.*organ_ct.*\[0, 3\).*\[0, 1, 5\]"),
        ("label_float", r"bad_float_seg\.nii\.gz.*organ_ct.*integers"),
        ("label_shape", r"bad_shape_seg\.nii\.gz.*organ_ct.*\(1, 8, 8, 8\).*got \(1, 8, 8, 6\)"),
        ("nan", r"bad_nan\.nii\.gz.*organ_ct.*NaN"),
    ],
)
def test_check_task_input_errors(tmp_path, case, expect):
    img3 = np.zeros((8, 8, 8), np.float32)
    lab3 = np.zeros((8, 8, 8), np.uint8)
    if case == "channels":
        item = {"image": save(tmp_path / "bad_channels.nii.gz", img3), "label": save(tmp_path / "l.nii.gz", lab3)}
        item["task"] = "lesion_petct"
    elif case == "2d_for_3d":
        item = {"image": save(tmp_path / "bad_2d.nii.gz", img3[..., 0]), "task": "organ_ct"}
    elif case == "3d_for_2d":
        item = {"image": save(tmp_path / "bad_3d.nii.gz", img3), "task": "head_us"}
    elif case == "label_range":
        lab = lab3.copy()
        lab[0, 0, 0], lab[1, 1, 1] = 5, 1
        item = {"image": save(tmp_path / "i.nii.gz", img3), "label": save(tmp_path / "bad_range_seg.nii.gz", lab)}
        item["task"] = "organ_ct"
    elif case == "label_float":
        lab = lab3.astype(np.float32)
        lab[0, 0, 0] = 0.5
        item = {"image": save(tmp_path / "i.nii.gz", img3), "label": save(tmp_path / "bad_float_seg.nii.gz", lab)}
        item["task"] = "organ_ct"
    elif case == "label_shape":
        item = {"image": save(tmp_path / "i.nii.gz", img3)}
        item["label"] = save(tmp_path / "bad_shape_seg.nii.gz", lab3[..., :6])
        item["task"] = "organ_ct"
    else:
        img = img3.copy()
        img[2, 2, 2] = np.nan
        item = {"image": save(tmp_path / "bad_nan.nii.gz", img), "task": "organ_ct"}
    with pytest.raises(ValueError, match=expect):
        _load_and_check(item)
    # inside a Compose, MONAI re-raises as RuntimeError("applying transform ...") from the ValueError
    pipe = T.val_transforms(CATALOG) if "label" in item else T.inference_transforms(CATALOG)
    with pytest.raises(RuntimeError) as e:
        pipe(item)
    assert isinstance(e.value.__cause__, ValueError)
    assert re.search(expect, str(e.value.__cause__))


def test_squeeze_2d_singleton_axis(tmp_path):
    img = np.random.default_rng(0).normal(size=(20, 16, 1)).astype(np.float32)
    lab = np.zeros((20, 16, 1), np.uint8)
    lab[5:9, 5:9] = 1
    item = {"image": save(tmp_path / "s.nii.gz", img), "label": save(tmp_path / "s_seg.nii.gz", lab), "task": "head_us"}
    d = _load_and_check(item)
    assert d["image"].shape == (1, 20, 16) and d["label"].shape == (1, 20, 16)
    out = T.val_transforms(CATALOG)(item)
    assert out["image"].ndim == 3 and out["image"].pixdim.tolist() == [1.0, 1.0]


RGB_CATALOG = TaskCatalog.from_dict(
    {
        "name": "rgb",
        "tasks": [
            {
                "name": "skin",
                "id": 0,
                "dims": 2,
                "modalities": ["Dermoscopy", "Dermoscopy", "Dermoscopy"],
                "labels": ["background", "lesion"],
                "spacing": [0.5, 0.5],
                "patch_size": [16, 16],
            }
        ],
    }
)


def _rgb_case(tmp_path, layout):
    """A 2D RGB image (values 0-255, distinct channel levels) with a round lesion, written in ``layout``."""
    rng = np.random.default_rng(4)
    shape = (30, 24)
    lab = blob_label(shape, (15, 12), 5)
    img = np.stack([rng.uniform(0, 1, shape) * s + o for s, o in ((40, 180), (20, 120), (60, 90))], -1)
    img = np.where(lab[..., None] > 0, 0.5 * img, img).astype(np.float32)  # (X, Y, 3), darker lesion
    if layout == "x_y_1_c":
        img = img[:, :, None, :]
    aff = np.diag([0.4, 0.4, 1.0, 1.0])
    item = {
        "image": save(tmp_path / f"rgb_{layout}.nii.gz", img, aff),
        "label": save(tmp_path / f"rgb_{layout}_seg.nii.gz", lab, aff),
        "task": "skin",
    }
    return item, lab


def test_2d_rgb_pipelines(tmp_path):
    """A 2D three-channel image stored as (X, Y, 1, 3) comes out as (3, X, Y), z-scored per channel."""
    item, lab = _rgb_case(tmp_path, "x_y_1_c")
    out = T.val_transforms(RGB_CATALOG)(item)
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and image.shape == (3, 24, 19) and label.shape == (1, 24, 19)
    assert out["image"].pixdim.tolist() == [0.5, 0.5]
    assert bool(torch.isfinite(image).all())
    flat = image.reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    assert float(image[:, label[0] > 0].mean()) < float(image[:, label[0] == 0].mean())  # channels kept apart
    for augment in (False, True):
        patch = T.train_transforms(RGB_CATALOG, augment=augment).set_random_state(0)(item)
        assert patch["image"].shape == (3, 16, 16) and patch["label"].shape == (1, 16, 16)
        assert set(torch.unique(patch["label"]).tolist()) <= {0.0, 1.0}


def test_2d_rgb_channel_last_3d_file_is_rejected(tmp_path):
    """A 3-D (X, Y, 3) file reads as one channel of a 3D volume: the check names the expected layout."""
    item, _ = _rgb_case(tmp_path, "x_y_c")
    expect = r"rgb_x_y_c\.nii\.gz.*skin.*2D image with 3 channel.*got a 3D image.*stored as \(X, Y, 1, C\)"
    with pytest.raises(ValueError, match=expect):
        d = item
        for t in (
            T.AttachTaskd(RGB_CATALOG),
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            T.Squeeze2Dd(["image", "label"], RGB_CATALOG),
            T.CheckTaskInputd(RGB_CATALOG),
        ):
            d = t(d)


# ---------------------------------------------------------------------------------------------- geometry
def test_task_spacing_resamples_and_inverts():
    affine = torch.diag(torch.tensor([1.5, 1.0, 2.0, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.rand(1, 20, 30, 12), affine=affine)
    lab = MetaTensor((torch.rand(1, 20, 30, 12) > 0.7).float(), affine=affine)
    spacing = T.TaskSpacingd(["image", "label"], CATALOG)
    d = spacing({"image": img, "label": lab, "task": "organ_ct"})
    np.testing.assert_allclose(d["image"].pixdim.numpy(), [2.0, 2.0, 3.0], atol=1e-6)
    assert d["image"].shape == d["label"].shape == (1, 15, 16, 8)  # MONAI: round((n - 1) * old / new) + 1
    assert set(torch.unique(d["label"]).tolist()) <= {0.0, 1.0}  # nearest
    d2 = T.TaskSpacingd("image", CATALOG)({"image": MetaTensor(torch.rand(1, 20, 30), affine=torch.eye(3)), "task": 2})
    assert d2["image"].shape == (1, 20, 30)
    # MONAI Label's request carries the string "image_path" beside "image"; MONAI's Spacingd would call .update on it
    nifti = MetaTensor(torch.rand(1, 20, 30, 12), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    d3 = T.TaskSpacingd("image", CATALOG)({"image": nifti, "image_path": "case.nii.gz", "task": "organ_ct"})
    assert d3["image_path"] == "case.nii.gz" and d3["image"].shape == (1, 15, 16, 8)
    d["pred"] = d["label"].clone()
    inv = Invertd("pred", spacing, orig_keys="label", nearest_interp=True)(d)
    assert inv["pred"].shape == (1, 20, 30, 12)
    np.testing.assert_allclose(inv["pred"].affine.numpy(), affine.numpy(), atol=1e-6)


def test_pipeline_round_trip_identity_grid(tmp_path):
    """Spacing equal to the task's, non-RAS orientation: Invertd gives back exactly the file's label."""
    shape = (20, 16, 12)
    aff = np.diag([-2.0, 2.0, -3.0, 1.0])
    aff[:3, 3] = [5.0, -3.0, 40.0]
    img = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)
    lab = blob_label(shape, (9, 8, 6), 4)
    lab[9, 8, 6] = 2
    item = {"image": save(tmp_path / "i.nii.gz", img, aff), "label": save(tmp_path / "l.nii.gz", lab, aff)}
    item["task"] = "organ_ct"
    pipe = T.val_transforms(CATALOG)
    d = pipe(item)
    np.testing.assert_allclose(np.diag(d["image"].affine.numpy())[:3], [2.0, 2.0, 3.0], atol=1e-6)  # RAS
    d["pred"] = d["label"].clone()
    out = Invertd("pred", pipe, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert out.shape == (1, *shape)
    np.testing.assert_allclose(out.affine.numpy(), aff, atol=1e-5)
    np.testing.assert_array_equal(out[0].numpy(), lab)


@pytest.mark.parametrize("fixture", ["ct_case", "petct_case", "us_case"])
def test_pipeline_round_trip_resampled(fixture, request):
    item, img, lab = request.getfixturevalue(fixture)
    pipe = T.val_transforms(CATALOG)
    d = pipe(item)
    task = CATALOG[item["task"]]
    assert d["image"].shape[0] == task.num_channels and d["label"].shape[0] == 1
    np.testing.assert_allclose(d["image"].pixdim.numpy(), task.spacing, atol=1e-5)
    d["pred"] = d["label"].clone()
    out = Invertd("pred", pipe, orig_keys="label", nearest_interp=True)(d)["pred"]
    assert out.shape == (1, *lab.shape)
    np.testing.assert_allclose(out.affine.numpy(), nib.load(item["label"]).affine, atol=1e-5)
    assert set(torch.unique(out).tolist()) <= set(range(task.num_classes))
    dice = 2 * np.sum((out[0].numpy() > 0) & (lab > 0)) / (np.sum(out[0].numpy() > 0) + np.sum(lab > 0))
    assert dice > 0.8


def test_crop_foreground_uses_raw_nonzero_region(tmp_path):
    """A z-scored volume with a zero frame is cropped to the non-zero region (not to z-score > 0)."""
    img = np.zeros((40, 34), np.float32)
    img[5:35, 4:30] = np.random.default_rng(0).normal(50, 10, (30, 26))
    item = {"image": save(tmp_path / "u.nii.gz", img, np.eye(4)), "task": "head_us"}
    pipe = T.inference_transforms(CATALOG)
    d = pipe(item)
    assert d["image"].shape == (1, 30, 26) and "label" not in d
    assert abs(float(d["image"].mean())) < 1e-4  # z-scored after the crop
    d["pred"] = MetaTensor(torch.ones(1, 30, 26))
    out = Invertd("pred", pipe, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert out.shape == (1, 40, 34) and float(out.sum()) == 30 * 26


def test_invert_after_dataloader_workers(ct_case, petct_case):
    """Items made in DataLoader worker processes invert in the main process (trace ids of forked workers)."""
    items = [ct_case[0], petct_case[0]]
    pipe = T.val_transforms(CATALOG)
    loader = DataLoader(Dataset(items, pipe), batch_size=1, num_workers=1)
    for batch, (_, _, lab) in zip(loader, [ct_case, petct_case]):
        d = decollate_batch(batch)[0]
        d["pred"] = d["label"].clone()
        out = Invertd("pred", pipe, orig_keys="label", nearest_interp=True)(d)["pred"]
        assert out.shape == (1, *lab.shape)


def test_per_task_inverse_with_foreign_trace():
    """A trace made by another instance (spawned worker, persistent cache) is inverted via its class name."""
    affine = torch.diag(torch.tensor([-1.5, 1.0, 2.0, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.rand(1, 20, 30, 12), affine=affine)
    geometry = Compose([T.TaskOrientationd("image", CATALOG), T.TaskSpacingd("image", CATALOG)])
    d = geometry({"image": img, "task": "organ_ct"})
    other = copy.deepcopy(geometry)  # new ids: no per-task instance matches the trace ids
    back = other.inverse(dict(d))["image"]
    assert back.shape == img.shape
    np.testing.assert_allclose(back.affine.numpy(), affine.numpy(), atol=1e-6)
    # the inverse checks the kind of transform it undoes
    # keep the orientation transform alive: a garbage-collected object's id can be reused by the next one
    orient = T.TaskOrientationd("image", CATALOG)
    d2 = orient({"image": img, "task": "organ_ct"})
    with pytest.raises(RuntimeError, match="expected 'SpatialResample'"):
        T.TaskSpacingd("image", CATALOG).inverse(d2)


# ---------------------------------------------------------------------------------------------- random
def test_random_transforms_patch_size_and_labels(ct_case, petct_case, us_case):
    pipe = T.train_transforms(CATALOG, augment=True)
    pipe.set_random_state(3)
    for item, _, _ in (ct_case, petct_case, us_case):
        task = CATALOG[item["task"]]
        for _ in range(4):
            d = pipe(item)
            assert isinstance(d, dict)
            assert tuple(d["image"].shape) == (task.num_channels, *task.patch_size)
            assert tuple(d["label"].shape) == (1, *task.patch_size)
            vals = torch.unique(d["label"])
            assert torch.equal(vals, vals.round()) and set(vals.tolist()) <= set(range(task.num_classes))
            assert torch.isfinite(d["image"]).all() and d["task_id"] == task.id


def test_small_volume_is_padded_to_the_patch():
    d = {
        "image": MetaTensor(torch.rand(1, 10, 9)),
        "label": MetaTensor((torch.arange(90).reshape(1, 10, 9) == 40).float()),
        "task": "head_us",
    }
    out = T.TaskRandCropd(catalog=CATALOG)(d)
    assert out["image"].shape == (1, 24, 20) and out["label"].shape == (1, 24, 20)


def test_foreground_oversampling_one_third_without_the_sampler():
    """Items without the sampler's flag: a foreground sample with chance 1/3, the others placed uniformly."""
    lab = torch.zeros(1, 128, 128)
    lab[0, 60:62, 70:72] = 1
    d = {"image": MetaTensor(torch.rand(1, 128, 128)), "label": MetaTensor(lab), "task": "head_us"}
    crop = T.TaskRandCropd(catalog=CATALOG)
    crop.set_random_state(0)
    n = 400
    hits = sum(bool(crop(d)["label"].sum() > 0) for _ in range(n))
    # expected 1/3 + 2/3 * P(a random crop hits the foreground) ~ 1/3 + 2/3 * (25 * 21) / (105 * 109) ~ 0.36
    assert 0.28 < hits / n < 0.45, hits / n


def test_forced_flag_decides_the_foreground():
    """The sampler's flag: force=True always centres the patch on foreground (of any class the case has, each
    about equally often), force=False places it uniformly (here it almost never holds the tiny foreground)."""
    lab = torch.zeros(1, 128, 128)
    lab[0, 60:62, 70:72] = 1
    lab[0, 10:50, 10:50] = 2  # a large second class: must not crowd out the small one
    catalog = TaskCatalog([task_dict("two", 0, ["background", "small", "large"], dims=2, modalities=["US"])])
    d = {"image": MetaTensor(torch.rand(1, 128, 128)), "label": MetaTensor(lab), "task": "two"}
    crop = T.TaskRandCropd(catalog=catalog)
    crop.set_random_state(0)
    forced = [crop({**d, T.FORCE_FG_KEY: True})["label"] for _ in range(200)]
    assert all(bool((p > 0).any()) for p in forced)
    small = sum(bool((p == 1).any()) for p in forced) / len(forced)
    assert 0.35 < small < 0.65, small  # class drawn uniformly, not by voxel count (40x40 vs 2x2)
    free = [crop({**d, T.FORCE_FG_KEY: False}) for _ in range(200)]
    assert sum(bool((p["label"] == 1).any()) for p in free) / len(free) < 0.1
    assert all(T.FORCE_FG_KEY not in p for p in free)


def test_rotated_and_scaled_patch_is_resampled_from_real_context():
    """Rotation and scaling are one resampling of the image around the patch centre: an image with content
    everywhere gives a patch without a single zero even at +-30 degrees on every axis and zoom-out 1.4, where
    cropping the patch first and rotating it (the former pipeline) fills the corners with zeros."""
    torch.manual_seed(0)
    img = MetaTensor(torch.rand(1, 64, 64, 64) + 1.0)
    lab = torch.zeros(1, 64, 64, 64)
    lab[0, 28:36, 28:36, 28:36] = 1
    lab[0, 30:34, 30:34, 30:34] = 2
    d = {"image": img, "label": MetaTensor(lab), "task": "organ_ct"}
    crop = T.TaskRandCropd(catalog=CATALOG, prob_rotate=1.0, prob_scale=1.0)
    crop.set_random_state(1)
    for _ in range(12):
        out = crop({**d, T.FORCE_FG_KEY: True})
        assert tuple(out["image"].shape) == (1, 16, 16, 12)
        assert float(out["image"].min()) >= 1.0  # bilinear between values in [1, 2]: no zero anywhere
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}  # nearest: labels stay labels
    # the extremes of the ranges together
    extreme = crop.sample(img, crop.coordinates((24, 24, 26), (16, 16, 12), (np.pi / 6,) * 3, 1.4))
    assert float(extreme.min()) >= 1.0 and isinstance(extreme, MetaTensor)
    # crop-then-rotate, as before: zero-filled corners
    from monai.transforms import Rotate

    patch = img[:, 24:40, 24:40, 26:38]
    assert float(Rotate((np.pi / 6,) * 3, padding_mode="zeros")(patch).min()) == 0.0


def test_unaugmented_patch_is_an_exact_crop_and_scale_zooms_out():
    img = MetaTensor(torch.arange(40 * 36, dtype=torch.float32).reshape(1, 40, 36))
    lab = MetaTensor(torch.zeros(1, 40, 36))
    crop = T.TaskRandCropd(catalog=CATALOG)
    crop.set_random_state(0)
    for _ in range(5):
        state = crop.R.get_state()
        out = crop({"image": img, "label": lab, "task": "head_us", T.FORCE_FG_KEY: False})
        crop.R.set_state(state)
        i, j = crop.place(lab, (24, 20), False, 2)
        assert torch.equal(out["image"].as_tensor(), img[:, i : i + 24, j : j + 20].as_tensor())
    # a scale above 1 samples a larger region (zoom out): a centred bar 10 voxels wide gets narrower
    bar = torch.zeros(1, 40, 36)
    bar[0, :, 13:23] = 1
    out = crop.sample(MetaTensor(bar), crop.coordinates((8, 8), (24, 20), None, 2.0), "nearest")
    assert int(out[0, 12].sum()) == 5
    # the sampling grid without rotation or scaling is the crop itself; a quarter turn maps rows to columns
    same = crop.sample(img, crop.coordinates((5, 7), (24, 20), None, None))
    assert torch.allclose(same.as_tensor(), img[:, 5:29, 7:27].as_tensor(), atol=1e-3)
    square = MetaTensor(torch.arange(21 * 21, dtype=torch.float32).reshape(1, 21, 21))
    turned = crop.sample(square, crop.coordinates((5, 5), (11, 11), (np.pi / 2,), None), "nearest")
    assert torch.equal(turned[0].as_tensor(), torch.rot90(square[0, 5:16, 5:16].as_tensor(), 1)) or torch.equal(
        turned[0].as_tensor(), torch.rot90(square[0, 5:16, 5:16].as_tensor(), -1)
    )


def test_set_random_state_makes_pipeline_deterministic(ct_case, us_case):
    def run(seed):
        pipe = T.train_transforms(CATALOG, augment=True).set_random_state(seed)
        return [pipe(item)["image"] for item in (ct_case[0], us_case[0], ct_case[0], us_case[0])]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_builders_validate_keys():
    with pytest.raises(ValueError, match="image_key, label_key"):
        T.random_transforms(CATALOG, keys=("image",))
    with pytest.raises(ValueError, match="keys must be"):
        T.deterministic_transforms(CATALOG, keys=("a", "b", "c"))
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        T.augmentation_transforms(4)


def test_normalize_inside_the_nonzero_mask_when_the_task_asks():
    """A task with nonzero_mask z-scores MR channels with the statistics of the non-zero region (any channel) and
    leaves 0 outside it (nnU-Net's use_mask_for_norm); without it, the whole channel counts (UniSeg's setting)."""
    from conftest import task_dict

    from uniseg_components.tasks import TaskCatalog

    tasks = [task_dict("brain", 0, modalities=("T1", "FLAIR")), task_dict("brain_masked", 1, modalities=("T1", "FLAIR"),
             nonzero_mask=True)]  # fmt: skip
    cat = TaskCatalog(tasks, "brains")
    x = torch.zeros(2, 8, 8, 8)
    x[0, 2:6, 2:6, 2:6] = torch.linspace(100, 300, 64).reshape(4, 4, 4)
    x[1, 2:6, 2:6, 3:6] = 50.0 + torch.arange(48.0).reshape(4, 4, 3)  # FLAIR is 0 on one slice of the brain
    masked = T.NormalizeModalityd("image", cat)({"image": x, "task": "brain_masked"})["image"]
    brain = x[0] != 0
    for c in range(2):
        inside = masked[c][brain]
        assert inside.mean().abs() < 1e-5 and inside.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
        assert (masked[c][~brain] == 0).all()  # the background stays 0
    whole = T.NormalizeModalityd("image", cat)({"image": x, "task": "brain"})["image"]
    assert whole[0].mean().abs() < 1e-5 and (whole[0][~brain] < 0).all()  # background shifted below 0
    assert cat.to_dict()["tasks"][1]["nonzero_mask"] is True and "nonzero_mask" not in cat.to_dict()["tasks"][0]
    assert TaskCatalog.from_dict(cat.to_dict()) == cat
    with pytest.raises(ValueError, match="nonzero_mask must be true or false"):
        TaskCatalog([task_dict("b", 0, modalities=("T1",), nonzero_mask="yes")], "x")

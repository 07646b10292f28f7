# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Inference at hospital scale: DICOM series in (ITK), DICOM SEG out (highdicom), sharding over torchrun ranks,
resuming with --skip_existing, and a summary in which one bad study never stops the others."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, config, subprocess_env, workflow, write_dicom_series

from uniseg_components import cli
from uniseg_components.checkpoints import save_checkpoint
from uniseg_components.dicom import find_series, read_dicom_seg, series_files, write_dicom_seg
from uniseg_components.io import list_images
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.tasks import TaskCatalog
from uniseg_components.transforms import inference_transforms

pytest.importorskip("highdicom")
pytestmark = pytest.mark.usefixtures("single_thread")
BUNDLE = "uniseg_universal_segmentation"
#: an axial CT grid as scanners write it: rows run posterior, columns left (LPS), slices superior
AFFINE = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, -1.4, 0.0, 30.0], [0.0, 0.0, 2.5, -60.0], [0.0, 0.0, 0.0, 1.0]])


def _volume(seed: int, shape: tuple[int, int, int] = (28, 24, 12)) -> np.ndarray:
    """A CT-like volume: air around a soft-tissue body with a bright blob."""
    rng = np.random.RandomState(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = np.where(x**2 + y**2 < 0.7, 40.0, -1000.0) + rng.normal(0, 10, shape)
    vol[(x - 0.2) ** 2 + y**2 + z**2 < 0.15] = 200.0
    return vol.astype(np.int16)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """Four one-series CT studies (DICOM) in an archive folder, the NIfTI file of the first, and a tiny UniSeg
    checkpoint of the demo catalog's 3D tasks."""
    root = tmp_path_factory.mktemp("dicom")
    archive = root / "archive"
    for i in range(4):
        write_dicom_series(archive / f"patient{i}" / f"study{i}", _volume(i), AFFINE)
    nifti = root / "nifti0.nii.gz"
    nib.save(nib.Nifti1Image(_volume(0), AFFINE), str(nifti))
    cat = TaskCatalog.builtin("demo").select(dims=3)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "model.pt", UniSeg.from_catalog(cat, features=[4, 8, 16, 16]), cat)
    return {"root": root, "archive": archive, "nifti": nifti, "ckpt": ckpt, "catalog": cat}


# --------------------------------------------------------------------------------------- reading DICOM series
def test_series_reads_like_the_nifti_of_the_same_volume(studies, caplog) -> None:
    """The deterministic pipeline gives the same array on the same RAS grid from the series and from the NIfTI; a
    NIfTI file goes straight to MONAI's reader by suffix (no reader tried and missed, nothing logged)."""
    pre = inference_transforms(studies["catalog"], default_task="abdomen_ct")
    series = studies["archive"] / "patient0" / "study0"
    with caplog.at_level(logging.DEBUG, logger="LoadImage"):
        b = pre({"image": str(studies["nifti"])})["image"]
    assert "unable to load" not in caplog.text
    a = pre({"image": str(series)})["image"]
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-4)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert a.meta["filename_or_obj"] == str(series)


def test_listing_finds_one_item_per_series_under_study_folders(studies, tmp_path) -> None:
    items = list_images(studies["archive"])
    assert [Path(it["image"]).name for it in items] == ["study0", "study1", "study2", "study3"]
    # a folder holding two series: one reference per series, '<folder>::<SeriesInstanceUID>'
    both = tmp_path / "both"
    write_dicom_series(both, _volume(5), AFFINE, series_uid="1.2.826.0.1.3680043.8.498.1")
    write_dicom_series(both / "tmp", _volume(6), AFFINE, series_uid="1.2.826.0.1.3680043.8.498.2")
    for f in (both / "tmp").iterdir():
        f.rename(both / f"b_{f.name}")
    (both / "tmp").rmdir()
    refs = [it["image"] for it in list_images(both)]
    assert refs == [f"{both}::1.2.826.0.1.3680043.8.498.1", f"{both}::1.2.826.0.1.3680043.8.498.2"]
    assert len(series_files(refs[1])) == 12
    assert series_files(refs[1].replace("::", "#")) == series_files(refs[1])  # '#' is read as the separator too
    with pytest.raises(ValueError, match="holds 2 DICOM series"):
        series_files(both)
    # a CSV of paths: with a header (image, task; relative paths from the CSV's folder) or without (first column)
    (tmp_path / "with_header.csv").write_text(f"id,image,task\n1,both,brain_mr\n2,{studies['nifti']},abdomen_ct\n")
    assert list_images(tmp_path / "with_header.csv") == [
        {"image": refs[0], "task": "brain_mr"}, {"image": refs[1], "task": "brain_mr"},
        {"image": str(studies["nifti"]), "task": "abdomen_ct"},
    ]  # fmt: skip
    (tmp_path / "plain.csv").write_text(f"{studies['nifti']}\n\n{studies['archive'] / 'patient3'}\n")
    assert [it["image"] for it in list_images(tmp_path / "plain.csv")] == [
        str(studies["nifti"]),
        str(studies["archive"] / "patient3" / "study3"),
    ]
    load = inference_transforms(studies["catalog"], default_task="abdomen_ct").transforms[1]  # LoadImaged
    for ref, seed in zip(refs, (5, 6)):
        np.testing.assert_array_equal(load({"image": ref})["image"].numpy(), _volume(seed))


def test_archive_layouts_same_folder_names_dicomdir_and_non_image_objects(studies, tmp_path) -> None:
    """p1/CT and p2/CT get different output names; a DICOMDIR, a SEG beside the slices and a folder of SEGs alone are
    not image series; a CSV from a spreadsheet (byte order mark) reads, one with an empty path cell is refused."""
    archive = tmp_path / "archive"
    for i, p in enumerate(("p1", "p2")):
        write_dicom_series(archive / p / "CT", _volume(i), AFFINE)
    (archive / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    seg = cli.infer(str(studies["ckpt"]), str(studies["archive"] / "patient1"), task="abdomen_ct",
                    out=str(tmp_path / "seg"), dicom_seg=True)  # fmt: skip
    shutil.copy(Path(seg[0]).with_suffix("").with_suffix(".dcm"), archive / "p1" / "CT" / "seg.dcm")
    shutil.copytree(tmp_path / "seg", archive / "results", ignore=shutil.ignore_patterns("*.json", "*.nii.gz"))
    refs = [it["image"] for it in list_images(archive)]
    uids = [find_series(archive / p / "CT")[0].uid for p in ("p1", "p2")]
    assert refs == [f"{archive / 'p1' / 'CT'}::{uids[0]}", f"{archive / 'p2' / 'CT'}::{uids[1]}"]
    assert len(series_files(refs[0])) == 12  # the SEG beside the slices is not a slice
    out = tmp_path / "pred"
    cli.infer(str(studies["ckpt"]), str(archive), task="abdomen_ct", out=str(out))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"CT_{u}_abdomen_ct.nii.gz" for u in uids)
    (tmp_path / "bom.csv").write_bytes("image\n".encode("utf-8-sig") + f"{studies['nifti']}\n".encode())
    assert list_images(tmp_path / "bom.csv") == [{"image": str(studies["nifti"])}]
    (tmp_path / "gap.csv").write_text(f"image,task\n{studies['nifti']},abdomen_ct\n,brain_mr\n")
    with pytest.raises(ValueError, match=r"gap.csv.*no image path in row\(s\) \[3\]"):
        list_images(tmp_path / "gap.csv")


@pytest.mark.parametrize("damage", ["missing", "spacing", "empty", "tilt", "unreadable"])
def test_irregular_series_is_refused_naming_the_folder(tmp_path, damage) -> None:
    folder = tmp_path / "study"
    files = write_dicom_series(folder, _volume(1), AFFINE)
    if damage == "missing":
        files[5].unlink()
        expected = r"1 slice\(s\) missing between .*slice0004.dcm.* and .*slice0006.dcm.*gap 5.000 mm"
    elif damage == "spacing":
        import pydicom

        for f in files[6:]:  # the upper half 0.7 mm higher: irregular, but not whole missing slices
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + 0.7]  # fmt: skip
            ds.save_as(f)
        expected = "inconsistent slice spacing, from 2.500 to 3.200 mm"
    elif damage == "tilt":
        import pydicom

        for k, f in enumerate(files):  # each slice 0.4 mm further along y: a 9 degree gantry tilt
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 0.4 * k,
                                       ds.ImagePositionPatient[2]]  # fmt: skip
            ds.save_as(f)
        expected = r"shifted in their plane .*up to 0.400 mm: a gantry tilt"
    elif damage == "unreadable":
        files[0].write_bytes(files[0].read_bytes()[:140])  # the preamble, then nothing: a truncated first slice
        expected = r"1 DICOM file\(s\) of its folder cannot be read .*slice0000.dcm"
    else:
        for f in files:
            f.unlink()
        (folder / "notes.txt").write_text("not DICOM")
        expected = "holds no readable DICOM series"
    with pytest.raises(ValueError, match=expected) as err:
        series_files(folder)
    assert str(folder) in str(err.value)


# --------------------------------------------------------------------------------------------- DICOM SEG out
def test_dicom_seg_holds_the_label_map_slice_by_slice_with_the_catalog_names(studies, tmp_path) -> None:
    """A label map on the series' grid (values 1, 2) written as SEG and read back: segment labels from the catalog,
    referencing the series, every slice's mask where the map has it."""
    series = studies["archive"] / "patient1" / "study1"
    image = inference_transforms(studies["catalog"], default_task="abdomen_ct").transforms[1]({"image": str(series)})
    grid = image["image"]
    label = torch.zeros((1, *grid.shape), dtype=torch.int64)
    label[0, 5:15, 4:10, 2:6] = 1
    label[0, 16:20, 12:20, 7:11] = 2
    from monai.data import MetaTensor

    label = MetaTensor(label, affine=grid.affine)
    out = write_dicom_seg(label, series, {0: "background", 1: "liver", 2: "tumour"}, tmp_path / "seg.dcm")
    read = read_dicom_seg(out)
    assert read["labels"] == ["liver", "tumour"] and read["frames"] == 2 * 12

    import highdicom as hd

    seg = hd.seg.segread(str(out))
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == find_series(series)[0].uid
    files = series_files(series)
    import pydicom

    for n, value in ((1, 1), (2, 2)):
        for k in (3, 8):  # a slice with segment 1 only and one with segment 2 only
            sop = pydicom.dcmread(files[k], stop_before_pixels=True).SOPInstanceUID
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[sop], segment_numbers=[n], assert_missing_frames_are_empty=True
            )[0, :, :, 0]
            np.testing.assert_array_equal(mask, (label[0, :, :, k].numpy().T == value).astype(mask.dtype))
    unnamed = label.clone()
    unnamed[0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"label values \[3\] have no name"):
        write_dicom_seg(unnamed, series, {1: "liver", 2: "tumour"}, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()

    # overlapping masks (Hermes' per-target output): one segment per channel, the tumour inside the organ
    masks = MetaTensor(torch.cat([label >= 1, label == 2]).long(), affine=grid.affine)
    seg = hd.seg.segread(str(write_dicom_seg(masks, series, {1: "organ", 2: "tumour"}, tmp_path / "masks.dcm")))
    sop = pydicom.dcmread(files[8], stop_before_pixels=True).SOPInstanceUID
    both = seg.get_pixels_by_source_instance(source_sop_instance_uids=[sop], segment_numbers=[1, 2])[0]
    np.testing.assert_array_equal(both, masks[:, :, :, 8].numpy().transpose(2, 1, 0).astype(both.dtype))
    assert both[..., 0].sum() == both[..., 1].sum() > 0  # on slice 8 the organ mask holds the whole tumour


# ----------------------------------------------------------------------------- the CLI: DICOM in, SEG and NIfTI out
def test_infer_on_a_series_equals_the_nifti_route_and_writes_a_seg(studies, tmp_path) -> None:
    series = studies["archive"] / "patient0" / "study0"
    out = tmp_path / "pred"
    written = cli.infer(str(studies["ckpt"]), f"{series},{studies['nifti']}", task="abdomen_ct", out=str(out),
                        dicom_seg=False)  # fmt: skip
    a, b = nib.load(written[0]), nib.load(written[1])
    assert Path(written[0]).name == "study0_abdomen_ct.nii.gz" and a.shape == _volume(0).shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.asarray(a.dataobj).any()  # the untrained network marks something, so the comparison means something

    cli.infer(str(studies["ckpt"]), str(series), task="abdomen_ct", out=str(out), dicom_seg=True)
    seg = read_dicom_seg(out / "study0_abdomen_ct.dcm")
    assert seg["labels"] == list(studies["catalog"]["abdomen_ct"].labels[1:])
    summary = json.loads((out / "infer_summary_abdomen_ct.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 0
    assert summary["outputs"][0]["outputs"] == [
        str(out / "study0_abdomen_ct.nii.gz"),
        str(out / "study0_abdomen_ct.dcm"),
    ]

    # NIfTI beside DICOM with --dicom_seg: the NIfTI image gets its label map and no SEG (which needs source images)
    cli.infer(str(studies["ckpt"]), f"{series},{studies['nifti']}", task="abdomen_ct", out=str(out), dicom_seg=True)
    assert not (out / "nifti0_abdomen_ct.dcm").exists() and (out / "nifti0_abdomen_ct.nii.gz").is_file()
    summary = json.loads((out / "infer_summary_abdomen_ct.json").read_text())
    assert [len(r["outputs"]) for r in summary["outputs"]] == [2, 1] and summary["failed"] == 0


def test_torchrun_shards_resumes_and_reports_a_corrupt_study(studies, tmp_path) -> None:
    """Two Gloo ranks over five studies, one of them missing a slice: every good study segmented exactly once, the
    bad one reported with its reason (exit 1); the rerun with --skip_existing does only what is left."""
    archive = tmp_path / "archive"
    shutil.copytree(studies["archive"], archive)
    bad = archive / "patient9" / "study9"
    sorted(write_dicom_series(bad, _volume(9), AFFINE))[3].unlink()
    out = tmp_path / "pred"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "uniseg_components", "infer", str(studies["ckpt"]), str(archive), "--task", "abdomen_ct",
        "--out", str(out), "--device", "cpu", "--dicom_seg",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    summary = json.loads((out / "infer_summary_abdomen_ct.json").read_text())
    done = [r["image"] for r in summary["outputs"]]
    assert sorted(done) == sorted(str(archive / f"patient{i}" / f"study{i}") for i in range(4))  # each exactly once
    assert {r["rank"] for r in summary["outputs"]} == {0, 1} and summary["ranks"] == 2
    assert list(summary["failures"]) == [str(bad)] and "1 slice(s) missing" in summary["failures"][str(bad)]
    for i in range(4):
        assert read_dicom_seg(out / f"study{i}_abdomen_ct.dcm")["labels"] == ["organ", "tumour"]
        assert (out / f"study{i}_abdomen_ct.nii.gz").is_file()
    assert "4 done, 0 skipped, 1 failed" in proc.stdout and "1 of 5 image(s) could not be segmented" in proc.stderr
    assert sum(f"study{i}: " in proc.stdout for i in range(4)) == 4  # a log line per study, with its time and outputs

    shutil.rmtree(bad)
    (out / "study2_abdomen_ct.dcm").unlink()  # as if the run had stopped before study2's SEG
    proc = subprocess.run([*cmd, "--skip_existing"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "infer_summary_abdomen_ct.json").read_text())
    assert [r["image"] for r in summary["outputs"]] == [str(archive / "patient2" / "study2")]
    assert summary["skipped"] == 3 and summary["failed"] == 0


# ----------------------------------------------------------------------------------------- the bundle configs
def test_bundle_inference_of_dicom_folders_with_seg_and_the_multi_gpu_overlay(studies, tmp_path) -> None:
    bundle_root = tmp_path / "bundle"
    torch.manual_seed(0)  # the bundle's own network (the demo plan's features)
    save_checkpoint(bundle_root / "models" / "model.pt", UniSeg.from_catalog(studies["catalog"]), studies["catalog"])
    out = tmp_path / "eval"
    wf = workflow(BUNDLE, "inference.json", bundle_root, "infer", dataset_dir=str(studies["archive"]),
                  output_dir=str(out), dicom_seg=True, device="cpu")  # fmt: skip
    wf.run()
    wf.finalize()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"study{i}_abdomen_ct{e}" for i in range(4) for e in (".nii.gz", ".dcm")
    )
    (out / "study1_abdomen_ct.dcm").unlink()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file",
        str([config(BUNDLE, "inference.json"), config(BUNDLE, "multi_gpu_inference.json")]),
        "--bundle_root", str(bundle_root), "--dataset_dir", str(studies["archive"]), "--output_dir", str(out),
        "--dicom_seg", "True", "--skip_existing", "True",
    ]  # fmt: skip
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = sorted(p.name for p in out.iterdir() if stamp.get(p.name) != p.stat().st_mtime_ns)
    assert changed == ["study1_abdomen_ct.dcm", "study1_abdomen_ct.nii.gz"]

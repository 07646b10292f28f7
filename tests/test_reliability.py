# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The drills of docs/reliability.md: interruptions, damaged files, clashing or unwritable outputs, mistyped paths and
devices. Each test reproduces one way a user can lose work or get a silently wrong result, and checks what they see
instead."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import (
    BUNDLES,
    FAST,
    REPO,
    error_chain,
    interrupted_and_resumed,
    latest_state,
    run,
    subprocess_env,
    tiny_plan,
    workflow,
)

from uniseg_components import cli
from uniseg_components.bundle import ensure_datalist, find_bundle_root
from uniseg_components.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from uniseg_components.data import prepare
from uniseg_components.demo import write_demo_collection
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.tasks import TaskCatalog
from uniseg_components.workflows import ImagesFailed, check_device

pytest.importorskip("nilearn")
pytestmark = pytest.mark.usefixtures("single_thread")
BUNDLE = "uniseg_universal_segmentation"


def _flip(path: Path, n: int, at: float = 0.5) -> Path:
    """Invert ``n`` bytes of ``path`` from ``at`` (a fraction of its length) on: damage on disk or in transit."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """Two demo CT cases per task of a 3-task collection, prepared, and a tiny UniSeg checkpoint for them."""
    root = tmp_path_factory.mktemp("reliability")
    data = write_demo_collection(root / "demo", tasks=["abdomen_ct", "brain_mr", "lesion_petct"], num_cases=3)
    datalist = prepare(sorted(p for p in data.iterdir() if p.is_dir()), data / "tasks.json", root / "prepared")
    cat = TaskCatalog.builtin("demo").select(dims=3)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "model.pt", UniSeg.from_catalog(cat, features=[4, 8, 16, 16]), cat)
    images = sorted(str(p) for p in (data / "Demo01_AbdomenCT" / "imagesTr").glob("*.nii.gz"))
    return {"root": root, "data": data, "datalist": datalist, "ckpt": ckpt, "ct": images}


# ---------------------------------------------------------------------------------------------- 1. resume
def test_resume_keeps_the_best_model_and_its_epoch(demo, tmp_path):
    """The best-model bookkeeping is part of the training state: after an interruption the resumed run compares its
    validations with the best of the whole run, so model.pt is the uninterrupted run's."""
    common = {"dataset_dir": str(demo["data"]), "batches_per_task": 1, "augment": False, "val_interval": 1}
    states = interrupted_and_resumed(BUNDLE, tmp_path, epochs=3, **common)
    assert states["interrupted"]["best_checkpoint"]["best_epoch"] == 1
    assert states["resumed"]["best_checkpoint"] == states["full"]["best_checkpoint"]
    full = read_checkpoint(tmp_path / "full" / "models" / "model.pt")["model"]
    resumed = read_checkpoint(tmp_path / "part" / "models" / "model.pt")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resuming_a_finished_run_with_more_epochs_is_refused(demo, tmp_path):
    """The poly schedule of a finished run ends at its last epoch: more epochs would train at learning rate 0."""
    common = {"dataset_dir": str(demo["data"]), "validate#dataset#data": [], **FAST}
    run(workflow(BUNDLE, "train.json", tmp_path, **common))
    assert latest_state(tmp_path)["lr_scheduler"]["total_iters"] == 1
    wf = workflow(BUNDLE, "train.json", tmp_path, resume=True, **{**common, "epochs": 3})
    with pytest.raises(Exception) as err:
        wf.run()
    chain = error_chain(err.value)
    assert "schedule" in chain and "--epochs 1" in chain


# ---------------------------------------------------------------------------------------------- 2, 6. damaged images
def test_prepare_catches_a_damaged_gzip_and_writes_nothing(demo, tmp_path):
    folder = tmp_path / "Demo01_AbdomenCT"
    import shutil

    shutil.copytree(demo["data"] / "Demo01_AbdomenCT", folder)
    bad = _flip(sorted((folder / "imagesTr").glob("*.nii.gz"))[0], 64)
    with pytest.raises(ValueError, match=rf"{bad.name}.*(CRC|cannot be read)"):
        prepare([folder], "demo", tmp_path / "out")
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_infer_reports_a_damaged_and_a_truncated_image_and_segments_the_others(demo, tmp_path):
    good = demo["ct"][0]
    flipped = tmp_path / "flipped.nii.gz"
    flipped.write_bytes(Path(demo["ct"][1]).read_bytes())
    _flip(flipped, 64)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(Path(demo["ct"][2]).read_bytes()[:5000])
    out = tmp_path / "pred"
    with pytest.raises(ImagesFailed) as err:
        cli.infer(str(demo["ckpt"]), [good, str(flipped), str(truncated)], task="abdomen_ct", out=str(out))
    assert set(err.value.failed) == {str(flipped), str(truncated)}
    assert "CRC" in err.value.failed[str(flipped)] and "ended before" in err.value.failed[str(truncated)]
    assert "2 of 3 image(s) could not be segmented" in str(err.value)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [Path(good).name.replace(".nii.gz", "_abdomen_ct.nii.gz")]
    summary = json.loads((out / "infer_summary_abdomen_ct.json").read_text())
    assert (summary["done"], summary["failed"], sorted(summary["failures"])) == (
        1,
        2,
        sorted([str(flipped), str(truncated)]),
    )


def test_infer_goes_on_after_an_image_that_fails_in_the_pipeline(demo, tmp_path):
    """A readable image the task cannot take (2 channels for a 1-channel task) fails alone; the rest are segmented."""
    petct = sorted((demo["data"] / "Demo03_LesionPETCT" / "imagesTr").glob("*.nii.gz"))[0]
    images = [demo["ct"][0], str(petct), demo["ct"][1]]
    with pytest.raises(ImagesFailed) as err:
        cli.infer(str(demo["ckpt"]), images, task="abdomen_ct", out=str(tmp_path))
    assert list(err.value.failed) == [str(petct)] and "channel" in err.value.failed[str(petct)]
    assert sorted(err.value.written) == sorted([demo["ct"][0], demo["ct"][1]])
    assert all(p.is_file() for p in err.value.written.values())


def test_evaluate_scores_the_readable_cases_and_fails_at_the_end(demo, tmp_path, capsys):
    d = json.loads(Path(demo["datalist"]).read_text())
    bad = tmp_path / "truncated.nii.gz"
    first = next(it for it in d["validation"] if it["task"] == "brain_mr")
    bad.write_bytes(Path(first["image"]).read_bytes()[:4000])
    first["image"] = str(bad)
    (tmp_path / "dl.json").write_text(json.dumps({**d, "catalog": str(demo["data"] / "tasks.json")}))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", str(demo["ckpt"]), str(tmp_path / "dl.json")])
    assert exit_.value.code == 1
    out, errors = capsys.readouterr()
    assert "2 held-out case(s)" in out and "1 file(s) failed" in out  # the table of the others is printed
    assert "truncated.nii.gz" in errors and "Traceback" not in errors


# ---------------------------------------------------------------------------------------------- 3. damaged checkpoint
def test_a_damaged_checkpoint_is_refused(demo, tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(Path(demo["ckpt"]).read_bytes())
    _flip(ckpt, 256, at=0.6)
    with pytest.raises(ValueError, match="model.pt"):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="model.pt"):
        cli.infer(str(ckpt), demo["ct"][0], task="abdomen_ct", out=str(tmp_path / "pred"))
    assert not (tmp_path / "pred").exists()


# ---------------------------------------------------------------------------------------------- 4. outputs
def test_outputs_that_would_clash_or_cannot_be_written_stop_before_any_work(demo, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    twin = other / Path(demo["ct"][0]).name  # same file name in another folder
    twin.write_bytes(Path(demo["ct"][0]).read_bytes())
    out = tmp_path / "pred"
    with pytest.raises(ValueError, match="would both be written as"):
        cli.infer(str(demo["ckpt"]), [demo["ct"][0], str(twin)], task="abdomen_ct", out=str(out))
    plain = tmp_path / (Path(demo["ct"][1]).name[: -len(".gz")])  # scan.nii beside scan.nii.gz
    nib.save(nib.load(demo["ct"][1]), str(plain))
    with pytest.raises(ValueError, match="would both be written as"):
        cli.infer(str(demo["ckpt"]), [demo["ct"][1], str(plain)], task="abdomen_ct", out=str(out))
    assert not out.exists() or not list(out.iterdir())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="a_file/pred.*not writable"):
        cli.infer(str(demo["ckpt"]), demo["ct"][0], task="abdomen_ct", out=str(blocker / "pred"))


# ---------------------------------------------------------------------------------------------- 5. dataset_dir typos
def test_a_mistyped_dataset_dir_is_an_error_and_the_demo_goes_only_to_the_default(demo, tmp_path):
    typo = tmp_path / "my_dat"  # not there
    wf = workflow(BUNDLE, "train.json", tmp_path / "run", dataset_dir=str(typo), **FAST)
    with pytest.raises(Exception) as err:
        wf.run()
    chain = error_chain(err.value)
    assert "my_dat" in chain and "does not exist" in chain
    assert not typo.exists() and not (tmp_path / "run" / "demo_data").exists()
    with pytest.raises(FileNotFoundError, match="is empty"):
        (tmp_path / "empty").mkdir()
        ensure_datalist(tmp_path / "empty", demo_dir=tmp_path / "demo_data")


# ---------------------------------------------------------------------------------------------- 7. patch vs plan
def test_a_patch_the_network_cannot_take_is_refused_when_the_catalog_loads(tmp_path):
    d = TaskCatalog.builtin("demo").to_dict()
    d["tasks"][1]["patch_size"] = [48, 44, 48]
    (tmp_path / "tasks.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"tasks.json.*task 'brain_mr'.*\[48, 44, 48\].*total stride \[8, 8, 8\]"):
        TaskCatalog.load(tmp_path / "tasks.json")
    d["tasks"][1]["patch_size"] = [48, 48, 48]
    d["plan"] = tiny_plan(patch=(48, 48, 48))  # total stride 8 in 3D, 8 in-plane for the 2D tasks (96 x 96 ...)
    TaskCatalog.from_dict(d)


# ---------------------------------------------------------------------------------------------- 8. smaller
def test_a_bundle_run_from_another_folder_writes_into_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(find_bundle_root(BUNDLE)) == BUNDLES / BUNDLE
    assert find_bundle_root("no_such_bundle") == "."


def test_evaluate_says_which_cases_it_leaves_out(demo, tmp_path, caplog):
    cat = TaskCatalog.builtin("demo").select(names=["abdomen_ct"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ct_only.pt", UniSeg.from_catalog(cat, features=[4, 8, 16, 16]), cat)
    with caplog.at_level(logging.WARNING):
        res = cli._workflows.evaluate(ckpt, demo["datalist"])
    assert res["cases"] == 1 and set(res["per_task"]) == {"abdomen_ct"}
    assert "not scored" in caplog.text and "brain_mr" in caplog.text and "lesion_petct" in caplog.text


def test_cli_errors_are_one_line_unless_debugging(tmp_path):
    env = subprocess_env()
    cmd = [sys.executable, "-m", "uniseg_components", "infer", str(tmp_path / "nope.pt"), "x.nii.gz", "--task", "a"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "uniseg infer: error: checkpoint" in proc.stderr and "nope.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2
    proc = subprocess.run(cmd + ["--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_cli_shows_the_cause_of_a_bundle_failure_not_the_config_wrapper(demo, tmp_path, capsys):
    petct = sorted((demo["data"] / "Demo03_LesionPETCT" / "imagesTr").glob("*.nii.gz"))[0]
    with pytest.raises(SystemExit):
        cli.main(["infer", str(demo["ckpt"]), str(petct), "--task", "brain_mr", "--out", str(tmp_path)])
    errors = capsys.readouterr().err
    assert "expected 1 input channel(s)" in errors and "Failed to evaluate ConfigExpression" not in errors


def test_demo_data_removes_what_a_killed_run_left(tmp_path):
    stale = tmp_path / ".demo.tmp-999999-abcd"  # pid 999999: no such process
    (stale / "Demo01_AbdomenCT").mkdir(parents=True)
    write_demo_collection(tmp_path / "demo", tasks=["abdomen_ct"], num_cases=1)
    assert not stale.exists() and (tmp_path / "demo" / "tasks.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device is available.*--device cpu"):
        check_device("cuda")
    assert check_device("cpu") == torch.device("cpu") and check_device(None) is None

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Shared test fixtures and helpers: bundle paths and runs, the MONAI Label-style parser, a single-threaded torch, the
tiny plan the network tests build on, and an independent reference of the inference chain.

Everything here makes its own tiny data and runs on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
#: one epoch of one batch per task, no augmentation: the bundle tests' training runs
FAST = {"epochs": 1, "batches_per_task": 1, "augment": False, "sw_batch_size": 4}


def tiny_plan(features: Sequence[int] = (4, 8, 16, 16), patch: Sequence[int] = (16, 16, 16)) -> dict[str, Any]:
    """A plan of a few thousand parameters: one conv per stage, 3x3x3 kernels, stride 2 after stage 0."""
    n = len(features)
    return {
        "patch_size": list(patch),
        "features": list(features),
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": 1,
        "n_conv_per_stage_decoder": 1,
    }


#: the 4-stage tiny plan for 16^3 patches (network, export and method tests)
TINY_PLAN = tiny_plan()


def task_dict(
    name: str,
    id: int,
    labels: Sequence[str] = ("background", "fg"),
    dims: int = 3,
    modalities: Sequence[str] = ("CT",),
    spacing: Sequence[float] | None = None,
    patch: Sequence[int] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A task entry of a catalog (``TaskSpec.from_dict``): by default a 3D CT task at 1 mm with a 16^3 patch (16^2 in
    2D); ``fields`` adds any other field (``dataset``, ``label_offset``...)."""
    return {
        "name": name,
        "id": id,
        "dims": dims,
        "modalities": list(modalities),
        "labels": list(labels),
        "spacing": list(spacing) if spacing is not None else [1.0] * dims,
        "patch_size": list(patch) if patch is not None else [16] * dims,
        **fields,
    }


def mixed_catalog(
    ct_spacing: Sequence[float] = (2.0, 2.0, 2.0),
    petct_spacing: Sequence[float] = (2.0, 2.0, 2.0),
    petct_patch: Sequence[int] = (16, 16, 12),
) -> Any:
    """A catalog ``"test"`` of three MSD datasets: 3D CT (organ, tumour; ``Test01_CT``, patch 16x16x12), 3D two-channel
    PET/CT (lesion; ``Test02_PETCT``) and 2D ultrasound (head; ``Test03_US2D``, 1 mm, patch 24x20)."""
    from uniseg_components.tasks import TaskCatalog

    organ = task_dict("organ_ct", 0, ["background", "organ", "tumour"], spacing=ct_spacing, patch=(16, 16, 12))
    lesion = task_dict("lesion_petct", 1, ["background", "lesion"], modalities=["CT", "PET"], spacing=petct_spacing)
    head = task_dict("head_us", 2, ["background", "head"], dims=2, modalities=["US"], patch=(24, 20))
    organ["dataset"], lesion["dataset"], head["dataset"] = "Test01_CT", "Test02_PETCT", "Test03_US2D"
    lesion["patch_size"] = list(petct_patch)
    return TaskCatalog([organ, lesion, head], name="test")


def config(bundle: str, name: str) -> str:
    """The path of ``bundles/<bundle>/configs/<name>`` as a string (what ``ConfigWorkflow`` takes)."""
    return str(BUNDLES / bundle / "configs" / name)


def subprocess_env() -> dict[str, str]:
    """The environment of a test's subprocess: one thread, glibc keeping freed memory, this checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="1073741824")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def workflow(
    bundle: str, configs: str | Sequence[str], bundle_root: Path, workflow_type: str = "train", **override: Any
) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundle``'s config file(s) (names in ``configs/`` or paths) with
    ``bundle_root`` and the bundle's ``logging.conf``."""
    files = [configs] if isinstance(configs, str) else list(configs)
    files = [f if os.sep in f else config(bundle, f) for f in files]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        logging_file=config(bundle, "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **override,
    )
    wf.initialize()
    return wf


def run(wf: ConfigWorkflow) -> ConfigWorkflow:
    """Run and finalise a workflow; returns it."""
    wf.run()
    wf.finalize()
    return wf


def monai_label_parser(bundle: str, bundle_root: Path, **overrides: Any) -> ConfigParser:
    """Parse ``inference.json`` + ``metadata.json`` as MONAI Label's ``BundleInferTask`` does (string device,
    ``bundle_root`` set)."""
    parser = ConfigParser()
    parser.read_config(config(bundle, "inference.json"))
    parser.read_meta(config(bundle, "metadata.json"))
    parser.update({"bundle_root": str(bundle_root), "device": "cpu", **overrides})
    return parser


def error_chain(error: BaseException) -> str:
    """The messages of ``error`` and every error behind it (MONAI wraps config and transform errors), one per line."""
    parts: list[str] = []
    e: BaseException | None = error
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def latest_state(bundle_root: Path) -> dict[str, Any]:
    """The training state ``models/checkpoint_latest.pt`` of a bundle run."""
    return torch.load(bundle_root / "models" / "checkpoint_latest.pt", weights_only=True)


#: a ``run`` override that stops training after its first epoch (an interrupted run)
STOP_AFTER_FIRST_EPOCH = [
    "$@train#trainer.add_event_handler(monai.engines.workflow.Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())",
    "$@train#trainer.run()",
]


def interrupted_and_resumed(bundle: str, root: Path, epochs: int = 2, **override: Any) -> dict[str, dict[str, Any]]:
    """Train ``bundle``'s ``train.json`` for ``epochs`` epochs once uninterrupted (``root/full``) and once stopped after
    its first epoch and resumed with ``--resume`` (``root/part``).

    Returns:
        the training states ``{"full", "interrupted", "resumed"}`` (``checkpoint_latest.pt`` of each run).
    """
    states = {}
    run(workflow(bundle, "train.json", root / "full", epochs=epochs, **override))
    states["full"] = latest_state(root / "full")
    run(workflow(bundle, "train.json", root / "part", epochs=epochs, run=STOP_AFTER_FIRST_EPOCH, **override))
    states["interrupted"] = latest_state(root / "part")
    run(workflow(bundle, "train.json", root / "part", epochs=epochs, resume=True, **override))
    states["resumed"] = latest_state(root / "part")
    return states


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two training states hold the same iteration, weights (to 1e-6) and scheduler epoch."""
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def monai_label_training(bundle: str, bundle_root: Path, dataset_dir: Path, task: str, batches_per_task: int) -> Path:
    """Train ``bundle`` as MONAI Label's ``BundleTrainTask`` does: its own task-less ``{image, label}`` items of
    ``task`` (from ``dataset_dir``'s datalist), an empty validation list, its own ``max_epochs``. Returns the written
    ``models/model.pt``."""
    items = json.loads((dataset_dir / "datalist.json").read_text())["training"]
    data = [{"image": it["image"], "label": it["label"]} for it in items if it["task"] == task]
    override = {
        "dataset_dir": str(dataset_dir),
        "task": task,
        "train#dataset#data": data,
        "validate#dataset#data": [],
        "train#trainer#max_epochs": 1,
        "batches_per_task": batches_per_task,
        "augment": False,
    }
    wf = workflow(bundle, "train.json", bundle_root, run_id="run", **override)
    assert wf.parser.get_parsed_content("network") is not None
    run(wf)
    return bundle_root / "models" / "model.pt"


def batch_recorder_overlay(folder: Path) -> str:
    """An overlay config appending a ``BatchRecorder`` (which files and tasks each batch held, per rank) to the
    training handlers; returns its path."""
    path = folder / "record_batches.json"
    recorder = {"_target_": "uniseg_components.handlers.BatchRecorder", "output_dir": "@output_dir"}
    path.write_text(json.dumps({"+train#handlers": [recorder]}))
    return str(path)


def recorded_batches(output_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    """The batches ``BatchRecorder`` wrote for ``rank``."""
    return [json.loads(line) for line in (output_dir / f"batches_rank{rank}.jsonl").read_text().splitlines()]


def torchrun_training(bundle: str, bundle_root: Path, *args: str, overlays: Sequence[str] = ()) -> None:
    """``torchrun --nproc_per_node=2 -m monai.bundle run training`` of ``train.json`` + ``multi_gpu_train.json`` (+
    ``overlays``) on CPU (Gloo), with ``--bundle_root`` and further command-line ``args``; fails the test unless it
    exits 0."""
    files = [config(bundle, "train.json"), config(bundle, "multi_gpu_train.json"), *overlays]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", str(files), "--bundle_root", str(bundle_root), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def evaluate_run(bundle: str, bundle_root: Path, capsys: Any) -> str:
    """Run ``train.json`` + ``evaluate.json`` on a trained bundle root with the best weights and training's validation
    protocol (no mirroring, train.json's window weighting); check that it printed the Dice table and that the loaded
    best model scores what it scored in training's validation. Returns what it printed."""
    mode = json.loads(Path(config(bundle, "train.json")).read_text())["validate"]["inferer"].get("mode", "gaussian")
    overrides = {"eval_checkpoint": "best", "eval_mirror": False, "validate#inferer#mode": mode}
    run(workflow(bundle, ["train.json", "evaluate.json"], bundle_root, "eval", **overrides))
    out = capsys.readouterr().out
    assert "mean over tasks" in out
    saved = json.loads((bundle_root / "eval" / "dice_per_task.json").read_text())
    val = json.loads((bundle_root / "eval" / "val_dice_per_task.json").read_text())
    assert saved["mean"] == pytest.approx(val["mean"], abs=1e-5)  # the loaded best model scores as in training
    values = [v for classes in saved["per_task"].values() for v in classes.values()]
    assert saved["mean_over_classes"] == pytest.approx(sum(values) / len(values))
    assert "mean over classes (the papers)" in out
    return out


def monai_label_pipeline(bundle: str, bundle_root: Path, **overrides: Any) -> tuple[Any, Any, Any, Any]:
    """What MONAI Label's ``BundleInferTask`` builds from ``inference.json``: ``network_def`` with
    ``models/model.pt``'s ``model`` weights (every key must fit), ``preprocessing``, ``postprocessing`` without its
    ``SaveImaged`` transforms, and ``inferer``. Returns ``(network, pre, post, inferer)``."""
    from monai.transforms import Compose, SaveImaged

    parser = monai_label_parser(bundle, bundle_root, **overrides)
    network = parser.get_parsed_content("network_def")
    ckpt = torch.load(bundle_root / "models" / "model.pt", map_location="cpu", weights_only=True)
    result = network.load_state_dict(ckpt.get("model", ckpt), strict=False)  # MONAI Label takes either
    assert not result.missing_keys and not result.unexpected_keys
    pre = parser.get_parsed_content("preprocessing")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    return network.eval(), pre, post, parser.get_parsed_content("inferer")


def run_vendored_inference(root: Path, **run_args: Any) -> str:
    """Run ``inference.json`` of an unzipped release bundle ``root`` in a fresh interpreter that cannot import this
    checkout's (editable) installation: only the copy vendored in the bundle as ``scripts``. ``run_args`` go to
    ``monai.bundle.run``; fails the test unless it exits 0 with every ``scripts`` module from ``root``.
    Returns what it printed."""
    code = f"""
import importlib.util, os, sys
repo, root = {str(REPO)!r}, {str(root)!r}
# hide the editable install of this repository and anything on sys.path that is not the bundle
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) not in (repo, root, os.getcwd())]
assert importlib.util.find_spec("uniseg_components") is None, "the installed package is still importable"
sys.path.insert(0, root)  # what PYTHONPATH=<bundle root> or MONAI Label does
import scripts
from monai.bundle import run
run(run_id="run", config_file="configs/inference.json", meta_file="configs/metadata.json",
    logging_file="configs/logging.conf", **{run_args!r})
assert all(m.__file__.startswith(root) for n, m in sys.modules.items() if n.startswith("scripts"))
assert not any(n.startswith("uniseg_components") for n in sys.modules)
print("VENDORED_OK", scripts.__file__)
"""
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "VENDORED_OK" in proc.stdout
    return proc.stdout


@pytest.fixture(scope="module")
def single_thread():
    """Tiny convolutions run fastest (and deterministically) on one thread, even on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_prediction(network: torch.nn.Module, catalog: Any, image: str, task: str, sigmoid: bool = False) -> Any:
    """The label map of ``image`` for ``task`` on the file's grid, computed step by step without the bundle configs:
    the package's inference transforms, the task-aware sliding window (the plan's patch, or the task's for a catalog
    mixing ranks), softmax (or sigmoid) probabilities, ``Invertd``, argmax (or the sigmoid targets' label map).
    The bundles' inference must give exactly this."""
    from monai.transforms import Invertd

    from uniseg_components.inferers import TaskSlidingWindowInferer
    from uniseg_components.methods.hermes import targets_to_label
    from uniseg_components.transforms import inference_transforms

    pre = inference_transforms(catalog)
    data = pre({"image": image, "task": task})
    plan = network.plan
    mixed = any(t.dims != plan.spatial_dims for t in catalog)
    inferer = TaskSlidingWindowInferer(plan.patch_size, 2, 0.5, catalog=catalog if mixed else None)
    with torch.no_grad():
        logits = inferer(data["image"][None], network.eval(), task_id=int(data["task_id"]))[0].float()
    data["pred"] = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, 0)
    pred = Invertd("pred", pre, orig_keys="image", nearest_interp=False, to_tensor=True)(data)["pred"]
    return targets_to_label(pred, sigmoid=False) if sigmoid else pred.argmax(0, keepdim=True)


def reference_all_tasks(network: torch.nn.Module, catalog: Any, image: str, modalities: Sequence[str]) -> Any:
    """The merged label map of every task of ``modalities`` for ``image`` (softmax methods), step by step: the first
    task's preprocessing, one encoder pass per window (``TaskSlidingWindowInferer.all_tasks``), argmax per task,
    ``merge_task_labels``, ``Invertd`` with nearest interpolation."""
    from monai.transforms import Invertd

    from uniseg_components.inferers import TaskSlidingWindowInferer, merge_task_labels, tasks_for_image
    from uniseg_components.transforms import inference_transforms

    tasks = tasks_for_image(catalog, image, modalities)
    pre = inference_transforms(catalog)
    data = pre({"image": image, "task": tasks[0].name})
    plan = network.plan
    mixed = any(t.dims != plan.spatial_dims for t in catalog)
    inferer = TaskSlidingWindowInferer(plan.patch_size, 2, 0.5, catalog=catalog if mixed else None)
    with torch.no_grad():
        logits = inferer.all_tasks(data["image"][None], network.eval(), [t.id for t in tasks])
    data["pred"] = merge_task_labels([lg[0].float().argmax(0, keepdim=True) for lg in logits], tasks).float()
    pred = Invertd("pred", pre, orig_keys="image", nearest_interp=True, to_tensor=True)(data)["pred"]
    return pred.round().to(torch.int16), tasks


def outline_pixels(png: Any, colour: Sequence[float]) -> tuple[int, int]:
    """Pixels of an outline ``colour`` (RGB in [0, 1]) in the left (ground truth) and the right (prediction) column
    of a quick-look PNG read with ``matplotlib.image.imread``, above its legend."""
    import numpy as np

    near = np.all(np.abs(png[..., :3] - np.asarray(colour)) < 0.25, axis=-1)[: int(png.shape[0] * 0.92)]
    half = png.shape[1] // 2
    return int(near[:, :half].sum()), int(near[:, half:].sum())


def write_dicom_series(
    folder: Path,
    volume: Any,
    affine: Any,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str = "CT",
) -> list[Path]:
    """Write a ``(X, Y, Z)`` volume as a DICOM series of single-frame CT images, one file per slice, placed by the RAS
    ``affine`` the way a scanner places them (``ImagePositionPatient`` / ``ImageOrientationPatient`` in LPS): the test
    data of the DICOM inputs. Slice ``k`` is ``volume[:, :, k]`` (DICOM rows follow the volume's Y axis).

    Returns:
        the written files, slice 0 first.
    """
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    files = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "TEST01", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "tests"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(np.asarray(volume[:, :, k]).T.astype(np.int16)).tobytes()
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        files.append(path)
    return files

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""One pipeline: the CLI's ``train``, ``evaluate`` and ``infer`` run the bundles' own configs.

Every method is trained, evaluated and applied by its bundle's ``train.json`` / ``inference.json`` through MONAI's
``ConfigWorkflow`` (the same recipe, resume, seeding, atomic and checksummed checkpoints as
``python -m monai.bundle run``); the functions here only turn command-line arguments into config overrides and
collect the results:

* :func:`train`: ``<bundle>/configs/train.json`` of the method, writing ``model.pt`` (best validation Dice),
  ``model_final.pt`` and ``checkpoint_latest.pt`` into ``output_dir``.
* :func:`infer`: ``inference.json`` of the checkpoint's method with the checkpoint's own network and catalog, one run
  per task set (``--task all`` groups the images by the tasks of their modality).
* :func:`evaluate`: :func:`infer` on a datalist split, then Dice per task and class of each written label map
  against its label file, on the file's own grid, beside an all-background baseline.

Bundle folders are found by :func:`uniseg_components.bundle.bundle_dir`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .bundle import bundle_dir
from .checkpoints import load_checkpoint, trained_with_mirroring
from .data import load_datalist
from .dicom import is_series_reference, series_files
from .distributed import distributed_device, get_rank, init_distributed, is_main_process, shard, shutdown_distributed
from .inferers import tasks_for_image
from .io import (
    as_list,
    image_files,
    image_stem,
    list_images,
    output_path,
    output_paths,
    pending_images,
    read_json,
    verify_image,
    write_json,
)
from .methods import get_method, method_of
from .metrics import TaskDiceAggregator, format_dice_table, mean_over_classes
from .tasks import TaskCatalog
from .visualize import QuickLookCase, write_quicklook

__all__ = [
    "ImagesFailed",
    "bundle_dir",
    "run_workflow",
    "raise_root_cause",
    "check_device",
    "check_writable",
    "checkpoint_file",
    "verify_images",
    "train",
    "infer",
    "evaluate",
]

logger = logging.getLogger(__name__)


def run_workflow(
    bundle: str,
    configs: Sequence[str],
    workflow_type: str,
    overrides: Mapping[str, Any],
    run: bool = True,
    handlers: Sequence[Any] = (),
) -> ConfigWorkflow:
    """Build, initialise and (``run``) run and finalise a bundle's workflow.

    Args:
        bundle: bundle folder name (see :func:`uniseg_components.bundle.bundle_dir`).
        configs: config file names in ``configs/``, merged in order (``["train.json", "evaluate.json"]``).
        workflow_type: ``"train"`` or ``"infer"``.
        overrides: config id -> value (any Python object; strings starting with ``$`` or ``@`` are expressions).
        run: run and finalise it, default ``True``.
        handlers: objects with ``attach(engine)`` attached to the training workflow's ``train#trainer`` after the
            config's own handlers, default none.
    """
    root = bundle_dir(bundle)
    files = [str(root / "configs" / c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        **dict(overrides),
    )
    try:
        wf.initialize()
        if handlers:
            trainer = wf.parser.get_parsed_content("train#trainer")
            for handler in handlers:
                handler.attach(trainer)
        if run:
            try:
                wf.run()
            finally:
                wf.finalize()
    except Exception as e:
        raise_root_cause(e)
    return wf


def raise_root_cause(error: BaseException) -> None:
    """Re-raise the error behind MONAI's wrappers (``RuntimeError("Failed to evaluate ConfigExpression ...")``,
    ``RuntimeError("applying transform ...")``), whose own message names the file, the task and what was expected;
    ``error`` itself when it wraps nothing."""
    cause = error
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is error:
        raise error
    raise cause from None


def _checked(overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}


def train(
    datalist: str | os.PathLike,
    method: str = "uniseg",
    catalog: str | os.PathLike | TaskCatalog | None = None,
    output_dir: str | os.PathLike = "runs/uniseg",
    epochs: int | None = None,
    batches_per_task: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    val_interval: int | None = None,
    augment: bool | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
    compile: bool | None = None,
    amp_dtype: str | None = None,
    config: Mapping[str, Any] | None = None,
    bundle: str | None = None,
    handlers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train a method on the tasks of a datalist with its bundle's train.json (the method's recipe).

    Arguments left out keep the bundle's value. UniSeg's recipe: SGD Nesterov (momentum 0.99, weight decay 3e-5), lr
    1e-2 with poly decay (0.9), 1000 epochs of 50 single-task batches of 2 per task, gradient clipping at 12, Dice +
    CE with deep supervision, AMP on CUDA. OUTPUT_DIR gets model.pt (best mean validation Dice over tasks, or the
    final model without validation data), model_final.pt and checkpoint_latest.pt, each with the network config and
    the catalog inside (infer and evaluate need nothing else), and eval/ the TensorBoard logs and Dice tables.

    Args:
        datalist: datalist.json from prepare (training and validation lists of {image, label, task}).
        method: uniseg (default), meduniseg or hermes: which method and bundle recipe.
        catalog: catalog JSON, built-in name or catalog; default the datalist's own. Tasks of a rank the method does
            not support are left out.
        output_dir: default "runs/uniseg".
        epochs: training epochs; default the bundle's (UniSeg 1000); the demo uses far fewer.
        batches_per_task: batches of each task per epoch; default the bundle's (50; the fine-tune bundle's
            ``num_iterations``, 250).
        batch_size: default the bundle's (2).
        learning_rate: default the bundle's (UniSeg 1e-2).
        val_interval: validate every N epochs; default the bundle's (1).
        augment: nnU-Net-style augmentation; default the bundle's (True).
        device: "cuda", "cpu", ...; default CUDA when available.
        seed: default the bundle's (0).
        num_workers: data-loader workers (and processes filling the disk cache); default the bundle's: the CPU count
            less 2, at most 16 (0 on a 2-core machine).
        cache_dir: preprocess every case once into this folder and train from it (RAM stays bounded whatever the
            number of cases; a changed file, catalog or transform is preprocessed again); default none: the
            preprocessed cases are kept in RAM, right for small collections such as the demo.
        resume: continue from OUTPUT_DIR/checkpoint_latest.pt, default False.
        compile: ``torch.compile`` the network for training and validation (MONAI's engines' ``compile``); default
            the bundle's (False). Checkpoints hold the plain network's weights either way.
        amp_dtype: the autocast dtype on CUDA, "float16" or "bfloat16"; default the bundle's ("float16").
        config: other entries of the bundle's train.json, e.g. --config '{"momentum": 0.9, "cache_rate": 0.5}'.
        bundle: another bundle of the method to train with, e.g. "uniseg_finetune_segmentation" (one task, set by
            --config '{"task": ...}'); default the method's upstream bundle.
        handlers: (Python API) objects with ``attach(engine)`` attached to the trainer, default none.

    Returns:
        ``{"checkpoint", "final_checkpoint", "best_metric", "best_epoch", "details", "seconds", "iterations",
        "epochs", "method"}``; ``checkpoint`` is ``model.pt``; ``iterations`` and ``epochs`` are the trainer's counts
        at the end (those of a resumed run included).

    Raises:
        ValueError: unknown method, or a bundle that is not one of the method's.
    """
    t0 = time.time()
    m = get_method(method)
    if bundle is None:
        bundle = next(iter(m.bundles.values()))
    elif bundle not in m.bundles.values():
        raise ValueError(f"bundle {bundle!r} is not one of {m.title}'s bundles: {sorted(set(m.bundles.values()))}.")
    out = Path(output_dir)
    overrides = _checked(
        {
            "bundle_root": str(out),
            "ckpt_dir": str(out),
            "output_dir": str(out / "eval"),
            "datalist": str(datalist),
            "catalog": catalog,
            "epochs": epochs,
            "batches_per_task": batches_per_task,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "val_interval": val_interval,
            "augment": augment,
            "seed": seed,
            "num_workers": num_workers,
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "device": None if device is None else torch.device(device),
            "resume": bool(resume),
            "compile": None if compile is None else bool(compile),
            "amp_dtype": amp_dtype,
        }
    )
    if batches_per_task is not None and "batches_per_task" not in read_json(
        bundle_dir(bundle) / "configs" / "train.json", "bundle config"
    ):  # the fine-tune bundle (one task) calls them num_iterations
        overrides["num_iterations"] = overrides.pop("batches_per_task")
    overrides.update(m.bundle_overrides("train"))
    overrides.update(config or {})
    logger.info("training %s with %s/configs/train.json into %s", m.title, bundle, out)
    wf = run_workflow(bundle, ["train.json"], "train", overrides, handlers=handlers)
    best = wf.parser.get_parsed_content("best_checkpoint")
    state = wf.parser.get_parsed_content("train#trainer").state
    table = out / "eval" / "val_dice_per_task.json"
    details = read_json(table, "Dice table").get("per_task", {}) if table.is_file() else {}
    return {
        "method": m.name,
        "checkpoint": str(out / "model.pt"),
        "final_checkpoint": str(out / "model_final.pt"),
        "best_metric": None if best.best_epoch == 0 else best.best_metric,
        "best_epoch": None if best.best_epoch == 0 else best.best_epoch,
        "details": details,
        "seconds": time.time() - t0,
        "iterations": int(state.iteration),
        "epochs": int(state.epoch),
    }


def infer(
    checkpoint: str | os.PathLike,
    images: Any,
    task: str | int,
    out: str | os.PathLike = "predictions",
    modality: Any = None,
    mirror: bool = False,
    catalog: str | os.PathLike | TaskCatalog | None = None,
    device: str | torch.device | None = None,
    dicom_seg: bool = False,
    skip_existing: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    compile: bool | None = None,
    amp_dtype: str | None = None,
) -> list[Path]:
    """Segment images with a checkpoint through its bundle's ``inference.json``: label maps on each input's grid.

    Output files are ``out/<image name>_<task>.nii.gz`` (``_all`` for ``task="all"``, whose maps merge every task of the
    image's modalities with the catalog's label offsets), with ``dicom_seg`` also ``out/<image name>_<task>.dcm``.

    At scale: under ``torchrun`` the images are sharded across the ranks (each exactly once; one device per rank,
    CUDA ``LOCAL_RANK`` when available), rank 0 shows a progress bar of its share, every image gets a log line (time,
    tasks, output), ``skip_existing`` leaves out images whose outputs exist (outputs are written atomically, so an
    interrupted run continues where it stopped), a failing image is reported and the others go on, and the run
    ends with a summary (done, skipped, failed with reasons, studies/s) logged and written to
    ``out/infer_summary_<task>.json`` by rank 0.

    Args:
        checkpoint: ``model.pt`` written by training.
        images: a NIfTI file, a folder of them, a DICOM series folder or a folder of study folders holding DICOM
            series, a CSV of paths (:func:`uniseg_components.io.list_images`), a datalist JSON, or a list /
            comma-separated string.
        task: task name or id of the checkpoint's catalog, or ``"all"``.
        out: output folder, default ``"predictions"``.
        modality: with ``task="all"``, the images' channel modalities (``"CT"``, ``["CT", "PET"]``) when the channel
            count fits several modality combinations of the catalog; default: from each image.
        mirror: mirroring test-time augmentation on every axis, default ``False``.
        catalog: overrides the catalog stored in the checkpoint.
        device: default CUDA when available (under torchrun: this rank's device).
        dicom_seg: also write a DICOM SEG per DICOM series input, default ``False``.
        skip_existing: leave out images whose outputs all exist, default ``False``.
        num_workers: DataLoader workers that load the next images while the network works, default the bundle's
            (4 on CUDA, 0 on CPU).
        progress: show the progress bar (rank 0), default ``True``.
        compile: ``torch.compile`` the network (the inference config's ``compile``), default ``None`` (the config's:
            off).
        amp_dtype: the autocast dtype on CUDA, ``"float16"`` or ``"bfloat16"``, default the bundle's (float16).

    Returns:
        this rank's outputs (label maps) of the images done or skipped, in input order.

    Raises:
        FileNotFoundError, ValueError: missing images, unknown task or modality, unreadable checkpoint (before any
            output is written).
        ImagesFailed: (rank 0) some images failed; the others were done. The message lists the reasons.
    """
    t_start = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    device = check_device(device)
    if world > 1:  # one device per rank: CUDA LOCAL_RANK whatever CUDA device was named
        device = init_distributed(
            distributed_device() if device is None or device.type == "cuda" else device, timeout_s=INFERENCE_TIMEOUT_S
        )
    net, cat = load_checkpoint(checkpoint, catalog=catalog)
    items = _list_once(images, world)
    split = [image_name(it["image"]) for it in items if not isinstance(it["image"], (str, os.PathLike))]
    if split:
        raise ValueError(
            f"infer takes one file per image; {split[0]!r} is stored as one file per channel (nnU-Net v2): stack the "
            "channels into one 4-D NIfTI (channels last), or score such cases with evaluate."
        )
    all_tasks = str(task).lower() == "all"
    postfix = "all" if all_tasks else cat[task].name
    mods = as_list(modality) or None
    fixed = None if all_tasks else [cat[task]]
    if all_tasks and mods is not None:
        fixed = cat.tasks_for_channels(mods)  # the same tasks for every image unless they mix 2D and 3D
        if not fixed:
            tasks_for_image(cat, None, mods)  # raises the error naming the catalog's modality combinations
        fixed = None if len({t.dims for t in fixed}) > 1 else fixed
    out = check_writable(out)
    _check_unique_outputs([(it["image"], postfix) for it in items])
    exts = [".nii.gz"] + ([".dcm"] if dicom_seg else [])
    mine = shard(items)
    todo = pending_images(mine, out, postfix, exts, skip_existing)
    pending = {image_name(it["image"]) for it in todo}
    skipped = [image_name(it["image"]) for it in mine if image_name(it["image"]) not in pending]
    if skipped:
        logger.info("skipping %d image(s) whose outputs exist in %s", len(skipped), out)
    failed = verify_images([str(it["image"]) for it in todo])
    groups: dict[tuple[str, ...], list[str]] = {}
    for it in todo:
        image = str(it["image"])
        if image in failed:
            continue
        try:
            tasks = fixed or tasks_for_image(cat, image, mods)
        except Exception as e:  # noqa: BLE001 - an unreadable image is reported; the others go on
            failed[image] = str(e)
            logger.error("%s: %s", image, e)
            continue
        groups.setdefault(tuple(t.name for t in tasks), []).append(image)
    done: dict[str, dict[str, Any]] = {}
    bar = tqdm(
        total=len(todo),
        desc=f"infer (rank 0 of {world})" if world > 1 else "infer",
        unit="image",
        disable=not (progress and is_main_process()),
    )
    with bar, logging_redirect_tqdm():
        bar.update(len(failed))
        for names, group in groups.items():

            def record(image: str, seconds: float, names: tuple[str, ...] = names) -> None:
                outputs = [str(p) for p in output_paths(image, out, postfix, exts)]
                done[image] = {"outputs": outputs, "seconds": round(seconds, 3), "tasks": list(names)}
                logger.info("%s: %.1f s, %s -> %s", image, seconds, ", ".join(names), ", ".join(outputs))
                bar.update(1)

            _, errors = _run_inference(
                net, cat, checkpoint, group, [cat[n] for n in names], all_tasks, out, mirror, device,
                dicom_seg=dicom_seg, num_workers=num_workers, on_image=record, compile=compile, amp_dtype=amp_dtype,
            )  # fmt: skip
            failed.update(errors)
            bar.update(len(errors))
    summary = _inference_summary(items, done, skipped, failed, out, postfix, t_start, world)
    if world > 1:
        shutdown_distributed()
    if summary["failed"] and is_main_process():
        raise ImagesFailed({r["image"]: Path(r["outputs"][0]) for r in summary["outputs"]}, summary["failures"])
    return [output_path(it["image"], out, postfix) for it in mine if image_name(it["image"]) not in failed]


#: collective timeout of a sharded inference run: ranks that finish their share wait for the others in the summary
INFERENCE_TIMEOUT_S = 7 * 24 * 3600.0


def _list_once(images: Any, world: int) -> list[dict[str, Any]]:
    """``list_images(images)``, done by rank 0 alone and sent to the other ranks under torchrun (a DICOM archive is
    searched once, not once per rank); an error of the listing is raised on every rank."""
    if world <= 1 or not torch.distributed.is_initialized():
        return list_images(images)
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", list_images(images))
        except (FileNotFoundError, ValueError) as e:
            box[0] = (type(e).__name__, str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status != "ok":
        raise (FileNotFoundError if status == "FileNotFoundError" else ValueError)(value)
    return value


def _inference_summary(
    items: Sequence[Mapping[str, Any]],
    done: Mapping[str, Any],
    skipped: Sequence[str],
    failed: Mapping[str, str],
    out: Path,
    postfix: str,
    t_start: float,
    world: int,
) -> dict[str, Any]:
    """Gather every rank's results (a collective under torchrun) into the run's summary, timed from ``t_start`` to
    the end of the gathering (the slowest rank); rank 0 logs it and writes ``out/infer_summary_<task>.json``
    (``<task>``: ``postfix``)."""
    rank = get_rank()
    mine = {
        "done": [{"image": k, "rank": rank, **v} for k, v in done.items()],
        "skipped": list(skipped),
        "failed": dict(failed),
    }
    parts: list[Any] = [mine]
    if world > 1 and torch.distributed.is_initialized():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    seconds = time.time() - t_start
    all_done = sorted((r for p in parts for r in p["done"]), key=lambda r: r["image"])
    all_skipped = [k for p in parts for k in p["skipped"]]
    failures = {k: v for p in parts for k, v in p["failed"].items()}
    rate = len(all_done) / seconds if seconds > 0 else 0.0
    summary = {
        "images": len(items),
        "done": len(all_done),
        "skipped": len(all_skipped),
        "failed": len(failures),
        "ranks": world,
        "seconds": round(seconds, 2),
        "images_per_s": round(rate, 4),
        "outputs": all_done,
        "skipped_images": sorted(all_skipped),
        "failures": failures,
    }
    if is_main_process():
        write_json(out / f"infer_summary_{postfix}.json", summary, indent=2)
        logger.info(
            "infer: %d image(s): %d done, %d skipped, %d failed in %.1f s (%.3f images/s, %d rank(s)); summary in %s",
            len(items), len(all_done), len(all_skipped), len(failures), seconds, rate, world,
            out / f"infer_summary_{postfix}.json",
        )  # fmt: skip
        for image, reason in failures.items():
            logger.error("failed: %s: %s", image, reason)
    return summary


class ImagesFailed(ValueError):
    """Some images could not be segmented (the others were): ``written`` maps each done image to its output,
    ``failed`` each failed image to the reason; the message lists the failures."""

    def __init__(self, written: Mapping[str, Path], failed: Mapping[str, str]) -> None:
        super().__init__(written, failed)
        self.written, self.failed = dict(written), dict(failed)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {image}: {reason}" for image, reason in self.failed.items())
        total = len(self.written) + len(self.failed)
        return f"{len(self.failed)} of {total} image(s) could not be segmented:\n{lines}"


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``: the bundle's choice).

    Raises:
        ValueError: a CUDA device is asked for and none is available.
    """
    if device is None or device == "":
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: no CUDA device is available (torch {torch.__version__}, "
            f"{'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}); use --device cpu."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are available.")
    return dev


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be written there, before any work.

    Raises:
        PermissionError: the folder cannot be created or written to; the message names it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise PermissionError(f"output folder {str(folder)!r} is not writable ({e.strerror or e}).") from e
    return folder


def verify_images(paths: Sequence[str]) -> dict[str, str]:
    """Check every image up front (:func:`uniseg_components.io.verify_image`: present, gzip CRC and length, header;
    a DICOM series: :func:`uniseg_components.dicom.series_files`, one regular volume); returns ``{path: reason}`` of
    those that fail, each logged."""
    failed = {}
    for path in paths:
        try:
            if is_series_reference(path):
                series_files(path)
            else:
                verify_image(path)
        except (FileNotFoundError, ValueError) as e:
            failed[path] = str(e)
            logger.error("%s", e)
    return failed


def image_name(image: str | Sequence[str]) -> str:
    """An image's name in logs and reports: its path, or its files joined by ``" + "`` (one file per channel)."""
    return image if isinstance(image, str) else " + ".join(map(str, image))


def _check_unique_outputs(outputs: Sequence[tuple[Any, str]]) -> None:
    """Raise ``ValueError`` before any work when two of the ``(image, postfix)`` inputs would write the same output
    file (an image is a path or a list of paths, one per channel)."""
    seen: dict[tuple[str, str], str] = {}
    for image, postfix in outputs:
        key = (image_stem(image), postfix)
        if key in seen:
            raise ValueError(
                f"{seen[key]!r} and {image_name(image)!r} would both be written as {key[0]}_{key[1]}.nii.gz; rename "
                "one of them or segment them into separate output folders."
            )
        seen[key] = image_name(image)


def _run_inference(
    net: torch.nn.Module,
    cat: TaskCatalog,
    checkpoint: str | os.PathLike,
    images: list[Any],
    tasks: list[Any],
    all_tasks: bool,
    out: Path,
    mirror: bool,
    device: Any,
    dicom_seg: bool = False,
    num_workers: int | None = None,
    on_image: Callable[[str, float], None] | None = None,
    compile: bool | None = None,
    amp_dtype: str | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Run the bundle's ``inference.json`` for ``images`` of one task (or all ``tasks`` merged). When the run stops on
    an image, the images it did not reach run one by one, so that one bad image never stops the others. An image is
    a path or a list of paths (one per channel). ``dicom_seg``, ``num_workers``, ``compile`` and ``amp_dtype`` set
    the config's keys of these names (``None``: the config's); ``on_image(name, seconds)`` is called after each image
    (default: a log line).

    Returns:
        ``({image_name(image): output}, {image_name(image): reason})`` of the images done and failed.
    """
    m = method_of(net)
    postfix = "all" if all_tasks else tasks[0].name
    overrides = _checked(
        {
            "ckpt_path": str(checkpoint),
            "network_def": net,
            "task_catalog": cat,
            "load_pretrain": False,  # the network holds the checkpoint's (verified) weights already
            "task": "all" if all_tasks else tasks[0].name,
            "modality": list(tasks[0].modalities),
            "merged_tasks": tasks,
            "output_dir": str(out),
            "output_postfix": postfix,
            "mirror_axes": list(range(net.plan.spatial_dims)) if mirror else [],
            "device": device,
            "dicom_seg": bool(dicom_seg),
            "num_workers": num_workers,
            "compile": None if compile is None else bool(compile),
            "amp_dtype": amp_dtype,
        }
    )
    overrides.update(m.bundle_overrides("inference"))
    written: dict[str, Path] = {}
    failed: dict[str, str] = {}

    def run(batch: list[Any]) -> None:
        items = [{"image": i} for i in batch]
        wf = run_workflow(
            m.bundle_for(net), ["inference.json"], "infer", {**overrides, "datalist": items, "images": items}, run=False
        )
        ext = wf.parser.get_parsed_content("output_ext")
        done = _log_progress(wf, len(batch), on_image)
        error: Exception | None = None
        try:
            wf.run()
        except Exception as e:  # noqa: BLE001 - one image's failure is reported, the others go on
            error = e
        finally:
            wf.finalize()
        if error is None:
            written.update({image_name(i): output_path(i, out, postfix, ext) for i in batch})
        elif len(batch) > 1:  # the images before the failing one are done; the rest run one by one
            written.update({image_name(i): output_path(i, out, postfix, ext) for i in batch[: len(done)]})
            for i in batch[len(done) :]:
                run([i])
        else:
            try:
                raise_root_cause(error)
            except Exception as cause:  # noqa: BLE001
                failed[image_name(batch[0])] = str(cause)
                logger.error("%s: %s", image_name(batch[0]), cause)

    run(list(images))
    logger.info("%s: labels %s", ", ".join(sorted(t.name for t in tasks)), cat.label_names(tasks, all_tasks))
    return written, failed


def _log_progress(wf: ConfigWorkflow, total: int, on_image: Callable[[str, float], None] | None = None) -> list[str]:
    """After every image of an inference workflow's evaluator, call ``on_image(image, seconds)`` (default: log
    ``[i/n] image (s)``); returns the list the handler appends each finished image to."""
    from ignite.engine import Events

    evaluator = wf.parser.get_parsed_content("evaluator")
    t0 = [time.time()]
    done: list[str] = []

    def log(engine: Any) -> None:
        batch = engine.state.batch
        item = batch[0] if isinstance(batch, (list, tuple)) else batch
        name = (getattr(item.get("image"), "meta", None) or {}).get("filename_or_obj", "?")
        name = name[0] if isinstance(name, (list, tuple)) else name
        done.append(str(name))
        if on_image is not None:
            on_image(str(name), time.time() - t0[0])
        else:
            logger.info("[%d/%d] %s (%.1f s)", len(done), total, name, time.time() - t0[0])
        t0[0] = time.time()

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, log)
    return done


#: the checkpoint files a training run writes, by ``which`` (:func:`checkpoint_file`)
CHECKPOINT_FILES = {"final": "model_final.pt", "best": "model.pt"}


def checkpoint_file(checkpoint: str | os.PathLike, which: str = "final") -> Path:
    """The checkpoint to evaluate: ``checkpoint`` itself when it is a file; in a training output folder (or a bundle
    root, through its ``models/``) the final weights, ``model_final.pt`` (``which="final"``, the papers' choice), or
    the best by validation Dice, ``model.pt`` (``which="best"``).

    Raises:
        ValueError: ``which`` is neither ``"final"`` nor ``"best"``.
        FileNotFoundError: the folder holds no such checkpoint; the message names what training writes.
    """
    if which not in CHECKPOINT_FILES:
        raise ValueError(f"which must be 'final' or 'best', got {which!r}.")
    path = Path(checkpoint)
    if not path.is_dir():
        return path
    for folder in (path, path / "models"):
        if (folder / CHECKPOINT_FILES[which]).is_file():
            return folder / CHECKPOINT_FILES[which]
    raise FileNotFoundError(
        f"no {CHECKPOINT_FILES[which]} ({which} weights) in {str(path)!r} or its models/: training writes "
        "model_final.pt (final) and model.pt (best validation Dice, or final without validation)."
    )


def evaluate(
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike,
    split: str = "validation",
    mirror: bool | None = None,
    device: str | torch.device | None = None,
    predictions: str | os.PathLike | None = None,
    pictures: str | os.PathLike | None = None,
    pictures_per_task: int = 3,
    which: str = "final",
) -> dict[str, Any]:
    """Segment every case of a datalist split for its own task (:func:`infer`, the bundle's inference) and score the
    label maps against the label files, on each file's own grid, beside an all-background baseline; optionally draw
    a quick-look PNG per task (:func:`uniseg_components.visualize.write_quicklook`).

    The defaults are the papers' protocol: the final weights, Gaussian sliding window with overlap 0.5, and
    mirroring on every axis (8 passes in 3D) for a model trained with mirroring (the checkpoint records it).

    Args:
        checkpoint: a checkpoint file, or a training output folder / bundle root (see :func:`checkpoint_file`).
        datalist: ``datalist.json`` from ``prepare``.
        split: ``"validation"`` (default) or ``"training"``.
        mirror: mirroring TTA on every axis, default ``None``: as the checkpoint was trained
            (:func:`~uniseg_components.checkpoints.trained_with_mirroring`: on unless it was trained without
            augmentation, whose mirrored predictions are worse).
        device: default CUDA when available.
        predictions: folder that keeps the label maps (``<task>/<image>_<task>.nii.gz``), default ``None`` (a
            temporary folder, removed afterwards).
        pictures: folder for ``<task>.png`` quick-looks (the first ``pictures_per_task`` scored cases of the task,
            each on the slice with the most ground-truth foreground: ground-truth outlines beside the prediction's),
            default ``None`` (none drawn).
        pictures_per_task: cases per quick-look, default 3.
        which: for a folder, ``"final"`` (default) or ``"best"`` weights.

    A case whose image or label is missing, damaged or does not fit is reported by name and left out; the others are
    scored (``"failed"`` lists the files and reasons).

    Returns:
        ``{"mean", "mean_over_classes", "baseline_mean", "per_task", "baseline_per_task", "cases" (scored),
        "failed", "table", "pictures"}`` (``mean``: over tasks; ``mean_over_classes``: over every class of every
        task, the papers' average; ``pictures``: task -> PNG path).

    Raises:
        ValueError: unknown split or no case of the checkpoint's tasks; ``ImagesFailed`` when no case could be
            scored.
    """
    if split not in ("validation", "training"):
        raise ValueError(f"split must be 'validation' or 'training', got {split!r}.")
    checkpoint = checkpoint_file(checkpoint, which)
    if mirror is None:
        mirror = trained_with_mirroring(checkpoint)
    logger.info("evaluate: %s (mirroring %s)", checkpoint, "on" if mirror else "off")
    net, cat = load_checkpoint(checkpoint)
    train_items, val_items, _ = load_datalist(datalist)
    chosen = val_items if split == "validation" else train_items
    items = [it for it in chosen if it["task"] in cat]
    left_out = sorted({str(it["task"]) for it in chosen if it["task"] not in cat})
    if left_out:
        logger.warning(
            "%s: %s case(s) of task(s) %s are not scored: the checkpoint has no such task (tasks %s)",
            datalist,
            len(chosen) - len(items),
            left_out,
            cat.names,
        )
    if not items:
        raise ValueError(f"datalist {str(datalist)!r} has no {split} case of the checkpoint's tasks {cat.names}.")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        by_task.setdefault(cat[it["task"]].name, []).append(it)
    for name, task_items in by_task.items():
        _check_unique_outputs([(it["image"], name) for it in task_items])
    device = check_device(device)
    t0 = time.time()
    keep = predictions is not None
    root = check_writable(predictions) if keep else Path(tempfile.mkdtemp(prefix="uniseg-eval-"))
    failed = verify_images([str(p) for it in items for k in ("image", "label") for p in image_files(it[k])])
    scored = 0
    pictures_dir = None if pictures is None else check_writable(pictures)
    drawn: dict[str, str] = {}
    try:
        model, baseline = TaskDiceAggregator(cat), TaskDiceAggregator(cat)
        load = LoadImage(image_only=True, ensure_channel_first=True)
        for name, task_items in by_task.items():
            task = cat[name]
            task_items = [
                it
                for it in task_items
                if not any(str(p) in failed for k in ("image", "label") for p in image_files(it[k]))
            ]
            images = [it["image"] for it in task_items]
            if not images:
                continue
            paths, errors = _run_inference(net, cat, checkpoint, images, [task], False, root / name, mirror, device)
            failed.update(errors)
            shown: list[QuickLookCase] = []
            for it in task_items:
                if image_name(it["image"]) not in paths:
                    continue
                pred = load(str(paths[image_name(it["image"])])).round().to(torch.int16)
                label = load(it["label"]).round().to(torch.int16)
                if tuple(label.shape) != tuple(pred.shape):
                    failed[str(it["label"])] = (
                        f"label shape {tuple(label.shape)} differs from the prediction's {tuple(pred.shape)} on the "
                        f"image grid of {it['image']}."
                    )
                    logger.error("%s: %s", it["label"], failed[str(it["label"])])
                    continue
                d = model.add(pred, label, task.id)
                baseline.add(torch.zeros_like(label), label, task.id)
                scored += 1
                case = Path(image_files(it["image"])[0]).name
                logger.info("%s %s Dice %s", name, case, [round(float(v), 4) for v in d])
                if pictures_dir is not None and len(shown) < pictures_per_task:
                    try:
                        image = load(image_files(it["image"])[0])
                        shown.append(QuickLookCase.from_volumes(case, image, label, pred, dice=[float(v) for v in d]))
                    except Exception as e:
                        logger.warning("%s: left out of the quick-look (%s)", case, e)
            if shown:
                title = f"{name}: {len(shown)} {split} case(s), ground truth | prediction ({Path(checkpoint).name})"
                path = pictures_dir / f"{name}.png"  # type: ignore[operator]
                try:
                    drawn[name] = write_quicklook(shown, path, task.labels, title=title)["path"]
                except Exception as e:  # a picture is a by-product: never lose the scores for it
                    logger.warning("%s: no quick-look written (%s)", path, e)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if not scored:
        raise ImagesFailed({}, failed)
    per_task, base = model.per_task(), baseline.per_task()
    title = f"{split} Dice on {scored} held-out case(s), {time.time() - t0:.0f} s"
    if failed:
        title += f"; {len(failed)} file(s) failed and were not scored"
    table = format_dice_table(per_task, title=title, baseline=base)
    return {
        "mean": model.mean(),
        "mean_over_classes": mean_over_classes(per_task),
        "baseline_mean": baseline.mean(),
        "per_task": per_task,
        "baseline_per_task": base,
        "cases": scored,
        "failed": failed,
        "table": table,
        "pictures": drawn,
    }

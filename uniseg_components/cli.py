# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Command line: ``python -m uniseg_components <verb> [--help]`` (built with python-fire).

Verbs: ``demo-data``, ``plan``, ``prepare``, ``train``, ``evaluate``, ``infer``, ``benchmark``, ``package``, ``export``.
``train``, ``evaluate`` and ``infer`` run the bundles' own configs (:mod:`uniseg_components.workflows`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import workflows as _workflows
from .io import as_list, write_json

__all__ = [
    "demo_data",
    "plan",
    "prepare",
    "train",
    "evaluate",
    "infer",
    "benchmark",
    "package",
    "export",
    "import_weights",
    "main",
]

logger = logging.getLogger("uniseg_components")


def _setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute module it copies, per SEG


def demo_data(out: str = "demo_data", seed: int = 0, overwrite: bool = False, catalog: str = "demo") -> str:
    """Write the embedded demo collection (MSD format, no download) and its task catalog.

    Six tasks: synthetic abdominal CT (organ, tumour), brain MR tissues from the MNI152 template shipped with
    nilearn (CSF, grey and white matter), synthetic two-channel PET/CT lesions (3D), and three 2D tasks: fetal
    head ultrasound, chest X-ray (lungs, heart) and RGB dermoscopy (lesion). ``--catalog demo_new_tasks`` writes
    the held-out kidney_ct task instead (abdominal CT, kidneys and spleen), the new dataset of Hermes'
    incremental-learning demo.

    Args:
        out: output folder, default "demo_data"; it receives one folder per task and tasks.json.
        seed: random seed, default 0 (same seed, same files).
        overwrite: regenerate an existing collection, default False.
        catalog: built-in demo catalog (or catalog JSON of demo tasks) to write, default "demo".
    Returns:
        the output folder.
    """
    from .demo import write_demo_collection

    _setup_logging()
    t = time.time()
    path = write_demo_collection(out, seed=seed, overwrite=overwrite, catalog=catalog)
    logger.info("demo collection in %s (%.1f s); catalog %s", path, time.time() - t, Path(path) / "tasks.json")
    return str(path)


def plan(
    datasets: Any,
    out: str = "plan",
    gpu_memory_gb: float = 10.0,
    batch_size: int = 2,
    ct_normalization: str = "window",
    num_workers: int = 0,
    name: str = "planned",
) -> str:
    """Plan a task catalog from MSD v1 / nnU-Net v2 folders: OUT/tasks.json (readable, editable) + fingerprint.json.

    Every case is fingerprinted in parallel (spacing and shape from the headers; foreground intensities of CT
    channels). Per task: target spacing (median; the 10th percentile along the coarse axis of anisotropic data),
    modality per channel, labels. One network plan for all tasks: kernels and strides from the spacing anisotropy
    and the largest patch that fits the GPU memory budget (see uniseg_components.planning).

    Args:
        datasets: MSD folders (holding dataset.json), comma-separated or a list; a folder whose sub-folders hold
            dataset.json files stands for all of them.
        out: output folder, default "plan".
        gpu_memory_gb: GPU memory budget of one training step in GiB, default 10 (the UniSeg paper's).
        batch_size: training batch size the budget is for, default 2.
        ct_normalization: "window" (UniSeg's fixed [-325, 325] HU, default) or "foreground" (nnU-Net's statistics).
        num_workers: threads reading the cases, default 0 = the CPU count.
        name: catalog name, default "planned".
    Returns:
        the path of tasks.json.
    """
    from .data import dataset_folders
    from .planning import plan as plan_catalog

    _setup_logging()
    path = plan_catalog(
        dataset_folders(as_list(datasets)),
        out,
        gpu_memory_gb=gpu_memory_gb,
        batch_size=batch_size,
        ct_normalization=ct_normalization,
        num_workers=num_workers or None,
        name=name,
    )
    return str(path)


def prepare(
    datasets: Any,
    catalog: str = "",
    out: str = "prepared",
    val_fraction: float = 0.2,
    seed: int = 0,
    tasks: Any = None,
    split: Any = None,
    fold: int = 0,
) -> str:
    """Validate MSD-format folders against a task catalog and write datalist.json and tasks.json.

    Every case is checked (files exist and load, channel count and dimensionality match the task, label
    values inside the task's classes, no NaN); all problems are reported together and nothing is written if
    any case is bad.

    Args:
        datasets: MSD folders (holding dataset.json), comma-separated or a list; a folder whose sub-folders
            hold dataset.json files stands for all of them.
        catalog: catalog JSON path or built-in name; default: tasks.json inside the first folder given (as the
            demo collection has), else `plan` runs with its defaults and writes OUT/tasks.json and
            OUT/fingerprint.json (run `plan` yourself for another GPU memory budget or CT normalisation).
        out: output folder for datalist.json and tasks.json, default "prepared".
        val_fraction: share of each task's cases for validation, default 0.2.
        seed: split seed, default 0.
        tasks: which task each folder holds when the folder names differ from the catalog's `dataset` fields,
            as FOLDER=TASK pairs, comma-separated (e.g. Task03_Liver=liver,Task09_Spleen=spleen).
        split: nnU-Net's splits_final.json or splits_final.pkl (nnU-Net v1, UniSeg) instead of the seeded split: the
            cases of --fold's 'val' list are the validation cases. One file (or several, comma-separated) for all
            folders, or FOLDER=FILE pairs, comma-separated, one per dataset (nnU-Net's one split per dataset).
        fold: the fold of --split, default 0.
    Returns:
        the path of datalist.json.
    """
    from .data import dataset_folders
    from .data import prepare as prepare_datalist
    from .planning import catalog_for
    from .tasks import TaskCatalog

    _setup_logging()
    roots = as_list(datasets)
    folders = dataset_folders(roots)
    cat = TaskCatalog.resolve(catalog_for(roots, folders, catalog, out))
    mapping = None
    if tasks:
        pairs = [p.split("=", 1) for p in as_list(tasks)]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise ValueError(f"--tasks must be FOLDER=TASK pairs separated by commas, got {tasks!r}.")
        mapping = dict(pairs)
    splits: Any = as_list(split) or None
    if splits and all("=" in p for p in splits):
        splits = dict(p.split("=", 1) for p in splits)
    path = prepare_datalist(
        folders, cat, out, val_fraction=val_fraction, seed=seed, tasks=mapping, split=splits, fold=int(fold)
    )
    logger.info("datalist written to %s", path)
    return str(path)


def _config_entries(value: Any, option: str = "--config") -> dict[str, Any]:
    """A ``--config`` value as a dict of config entries: fire gives a dict for ``'{"a": 0.9}'`` but keeps JSON's
    ``true`` / ``false`` / ``null`` as strings, and a string when it cannot parse the value; both are read as JSON.

    Raises:
        ValueError: the value is not a JSON object (naming the option).
    """
    import json

    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{option} must be a JSON object such as '{{\"augment\": false}}', got {value!r} ({e})."
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object such as '{{\"augment\": false}}', got {value!r}.")
    literals = {"true": True, "false": False, "null": None}
    return {k: literals.get(v, v) if isinstance(v, str) else v for k, v in value.items()}


def _flag(value: Any, option: str) -> bool:
    """A command-line switch: a bool, or the strings true/false/1/0/yes/no in any case (fire passes ``--x false`` as
    the string "false", which ``bool()`` would take for True).

    Raises:
        ValueError: any other value, naming ``option``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{option} must be true or false, got {value!r}.")


@functools.wraps(_workflows.train)
def train(*args: Any, **kwargs: Any) -> str:
    from .metrics import format_dice_table

    if "config" in kwargs:
        kwargs["config"] = _config_entries(kwargs["config"])
    if "compile" in kwargs:
        kwargs["compile"] = _flag(kwargs["compile"], "--compile")
    _setup_logging()
    res = _workflows.train(*args, **kwargs)
    if res["details"]:
        print(format_dice_table(res["details"], title=f"last validation (best mean {res['best_metric']:.4f})"))
    logger.info("training finished in %.0f s; checkpoint %s", res["seconds"], res["checkpoint"])
    return str(res["checkpoint"])


def evaluate(
    checkpoint: str,
    datalist: str,
    split: str = "validation",
    mirror: Any = None,
    device: str = "",
    output: str = "",
    predictions: str = "",
    pictures: str = "",
    which: str = "final",
) -> float:
    """Segment the held-out cases of a datalist with the checkpoint's bundle inference and print Dice per task and
    class on each file's own grid, with the papers' protocol by default: the final weights, Gaussian sliding window
    (overlap 0.5) and mirroring on every axis (8 passes in 3D) for a model trained with mirroring.

    Beside the model's Dice, the table shows what an all-background prediction would score on the same cases
    (1 for a class absent from a case, else 0), the baseline the model must beat.

    Args:
        checkpoint: a checkpoint file, or a training output folder or bundle root: then its model_final.pt (--which
            final, default) or model.pt (--which best: the best validation Dice).
        datalist: datalist.json from `prepare`.
        split: "validation" (default) or "training".
        mirror: mirroring test-time augmentation on every axis, default: as the checkpoint was trained (on unless it
            was trained without augmentation, --augment False, whose mirrored predictions are worse); --mirror True or
            False decides.
        device: default CUDA when available.
        output: optional JSON file for the per-task results.
        predictions: optional folder that keeps the label maps (PREDICTIONS/<task>/<image>_<task>.nii.gz).
        pictures: optional folder for one quick-look PNG per task (PICTURES/<task>.png: three held-out cases, each on
            the slice with the most ground truth, ground-truth outlines beside the prediction's).
        which: "final" (default, the papers' choice) or "best", for a folder.
    Returns:
        the mean Dice over tasks.
    """
    from .workflows import evaluate as run_evaluation

    _setup_logging()
    res = run_evaluation(
        checkpoint,
        datalist,
        split=split,
        mirror=None if mirror in (None, "") else _flag(mirror, "--mirror"),
        device=device or None,
        predictions=predictions or None,
        pictures=pictures or None,
        which=which,
    )
    print(res["table"])
    for task, path in res["pictures"].items():
        logger.info("quick-look of %s: %s", task, path)
    if output:
        write_json(output, {k: v for k, v in res.items() if k != "table"}, indent=2)
    if res["failed"]:
        raise _workflows.ImagesFailed({}, res["failed"])
    return float(res["mean"])


def infer(
    checkpoint: str,
    images: Any,
    task: str,
    out: str = "predictions",
    modality: Any = None,
    mirror: bool = False,
    catalog: str = "",
    device: str = "",
    dicom_seg: bool = False,
    skip_existing: bool = False,
    num_workers: Any = None,
    compile: Any = None,
    amp_dtype: str = "",
) -> list[str]:
    """Segment NIfTI images or DICOM series for one task, or for all tasks of their modality, into label maps (the
    checkpoint's bundle inference); shards the studies across ranks under torchrun.

    Output files are OUT/<image name>_<task>.nii.gz on the grid of the input image (a DICOM series: its folder name,
    plus _<SeriesInstanceUID> when the folder holds several series), with --dicom_seg also OUT/<name>_<task>.dcm, a
    DICOM SEG referencing the series. With --task all the network segments every task of the image's modalities
    (UniSeg and MedUniSeg: encoder once per window, decoder once per task; Hermes: every target in one pass), and the
    label maps are merged with the catalog's label offsets (logged).

    `torchrun --nproc_per_node=G -m uniseg_components infer ...` gives every rank its share of the images (each once),
    a progress bar on rank 0 and a log line per image; a failing image is reported and the others go on; the run ends
    with a summary (done, skipped, failed with reasons, images/s), also in OUT/infer_summary_<task>.json.

    Args:
        checkpoint: model.pt written by `train` or a bundle.
        images: a NIfTI file, a folder of them, a DICOM series folder, a folder of study folders holding DICOM
            series (one output per series), a datalist JSON, a CSV of paths (an image column under a header, else
            the first column), or a comma-separated list.
        task: task name or id from the checkpoint's catalog, or "all".
        out: output folder, default "predictions".
        modality: with --task all, the image's channel modalities (e.g. CT or CT,PET) when its channel count
            fits several modality combinations of the catalog.
        mirror: mirroring test-time augmentation on every axis, default False.
        catalog: overrides the catalog stored in the checkpoint.
        device: default CUDA when available (under torchrun: cuda:LOCAL_RANK, or CPU).
        dicom_seg: also write a DICOM SEG per DICOM series input (highdicom), read back and checked, default False.
        skip_existing: leave out images whose outputs exist (an interrupted run continues), default False.
        num_workers: DataLoader workers loading the next images during inference, default 4 on CUDA, 0 on CPU.
        compile: torch.compile the network (compiled once per window shape; pays off over many studies), default:
            the bundle's inference.json (off).
        amp_dtype: autocast dtype on CUDA, float16 (default) or bfloat16.
    Returns:
        the label maps of this rank's images, done or skipped.
    """
    from .workflows import infer as run_inference

    _setup_logging()
    written = run_inference(
        checkpoint,
        images,
        task,
        out=out,
        modality=modality,
        mirror=mirror,
        catalog=catalog or None,
        device=device or None,
        dicom_seg=_flag(dicom_seg, "--dicom_seg"),
        skip_existing=_flag(skip_existing, "--skip_existing"),
        num_workers=None if num_workers in (None, "") else int(num_workers),
        compile=None if compile in (None, "") else _flag(compile, "--compile"),
        amp_dtype=amp_dtype or None,
    )
    return [str(p) for p in written]


def benchmark(
    catalog: str = "",
    patch: Any = None,
    repeats: int = 3,
    device: str = "",
    write: str = "",
    model: str = "all",
    workers: Any = None,
    scale_cases: Any = "10,40",
    images: str = "",
    checkpoint: str = "",
    task: str = "abdomen_ct",
    ranks: Any = "1,2",
    infer_args: Any = None,
    compile: Any = None,
) -> str:
    """Measure parameters, time ratios and throughput of each method, and the data path, in one run on this machine.

    Each method reports its own table (see docs/benchmarks.md): UniSeg (a) parameters of UniSeg and of the plain
    backbone, (b) the time ratio UniSeg / plain backbone for one training step at the same patch, (c) the time ratio
    of the all-tasks path / separate per-task passes with the ratio the multiply-accumulate counts allow, (d)
    sliding-window throughput, (e) per training step: seconds, TFLOP (FLOP counter), TFLOP/s and their share of the
    device's matrix peak (measured with a large matmul), peak GPU memory, operations (kernel launches) per step and
    those at full resolution with the bytes they move, and, compiled, seconds and the speed-up; MedUniSeg and Hermes
    the same kinds of figures for their networks. "loader": batches/s
    of the train pipeline on synthetic 512x512x160 CT through the disk cache at the timed patch, for 0 and the
    default worker count, beside the UniSeg training step rate. "scale" (not in "all", minutes): peak RSS of a short
    training run through the disk cache for 10 and 40 such cases. "infer" (not in "all"): studies/s of `infer` over
    the same studies on 1 and 2 ranks (torchrun), each a fresh command timed from start to exit.

    Args:
        catalog: catalog JSON or built-in name, default "" (each method's own: the paper's plan).
        patch: timed patch, comma-separated (e.g. 96,96,32); default the catalog's on CUDA and half of it per
            axis on CPU (the paper's patch needs ~18 GiB of RAM for a UniSeg step on a CPU).
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available.
        write: also write the markdown tables to this file.
        model: one name, a comma-separated list, or "all" (default: the methods and the loader): uniseg, meduniseg,
            hermes, loader, scale, infer.
        workers: loader worker counts, comma-separated, default 0 and the default count (1 if that is 0).
        scale_cases: case counts of "scale", default "10,40".
        images: studies of "infer" (a NIfTI folder, a DICOM archive...), default the demo's --task images.
        checkpoint: model of "infer", default an untrained UniSeg of the demo catalog.
        task: task of "infer", default "abdomen_ct".
        ranks: rank counts of "infer", comma-separated, default "1,2".
        infer_args: more `infer` arguments for "infer", e.g. "--dicom_seg" (a string, split on spaces).
        compile: also time the methods' training steps with torch.compile (eager against compiled), default on CUDA
            only (compiling takes minutes on a CPU).
    Returns:
        the markdown tables.
    """
    from .benchmark import run_benchmarks
    from .methods import METHODS

    _setup_logging()
    names = [*METHODS, "loader"] if str(model) == "all" else as_list(model)
    patch_size = [int(v) for v in as_list(patch)] if patch else None
    methods = [n for n in names if n not in ("loader", "scale", "infer")]
    sections = []
    if methods:
        sections.append(
            run_benchmarks(
                methods,
                catalog=catalog or None,
                patch_size=patch_size,
                repeats=repeats,
                device=device or None,
                compile=None if compile in (None, "") else _flag(compile, "--compile"),
            )
        )
    if "loader" in names:
        from .data_benchmark import format_loader_report, run_loader_benchmark

        counts = [int(w) for w in as_list(workers)] if workers is not None else None
        res = run_loader_benchmark(
            catalog or None, workers=counts, repeats=repeats, device=device or None, patch_size=patch_size
        )
        sections.append(f"### loader\n\n{format_loader_report(res)}")
    if "scale" in names:
        from .data_benchmark import format_scale_report, run_scale_benchmark

        res = run_scale_benchmark([int(n) for n in as_list(scale_cases)])
        sections.append(f"### scale\n\n{format_scale_report(res)}")
    if "infer" in names:
        from .data_benchmark import format_inference_report, run_inference_benchmark

        res = run_inference_benchmark(
            images or None,
            checkpoint or None,
            task=task,
            ranks=[int(n) for n in as_list(ranks)],
            device=device or None,
            extra_args=str(infer_args or "").split(),
        )
        sections.append(f"### infer\n\n{format_inference_report(res)}")
    report = "\n\n".join(sections)
    if write:
        from .io import write_text

        write_text(write, report + "\n")
    return report


def package(
    bundle: str,
    out: str = "dist",
    weights: str = "",
    weights_url: str = "",
    vendor: bool = True,
    check: bool = True,
    schema: str = "",
    task: str = "",
) -> str:
    """Write a bundle's release zip ``<out>/<name>_v<version>.zip`` in the model zoo's layout: this package vendored
    as the bundle's ``scripts/`` (a machine with only MONAI and its dependencies runs it; MONAI Label serves several
    such bundles side by side), trained weights as ``models/model.pt`` with their catalog, and checked first as the
    zoo's CI and MONAI Label would (see :mod:`uniseg_components.packaging`).

    Args:
        bundle: the bundle folder, e.g. ``bundles/uniseg_universal_segmentation``.
        out: output folder, default ``"dist"``.
        weights: a checkpoint to ship as ``models/model.pt`` (e.g. ``runs/uniseg/model.pt``), default none: the
            bundle folder's own ``models/``.
        weights_url: where the weights will be downloadable (writes ``large_files.yml`` with their md5, for the
            zoo's 25 MB file limit), default none.
        vendor: copy this package into the bundle, default ``True``.
        check: verify the staged release in a fresh interpreter first, default ``True``.
        schema: a local copy of the metadata schema, to also run ``verify_metadata`` offline, default none.
        task: the task the release serves by default (``metadata.json`` then describes it), default the bundle's.

    Returns:
        the zip's path (also printed, with its sha1).
    """
    from .packaging import package as _package
    from .packaging import sha1sum

    _setup_logging()
    path = _package(
        bundle,
        out=out,
        weights=weights or None,
        weights_url=weights_url or None,
        vendor=vendor,
        check=check,
        schema=schema or None,
        task=task or None,
    )
    print(f"{path}  sha1 {sha1sum(path)}")
    return str(path)


def import_weights(
    checkpoint: str, out: str = "model.pt", catalog: str = "uniseg_11tasks", unsafe: bool = False
) -> str:
    """Convert the UniSeg authors' released checkpoint (yeerwen/UniSeg: an nnU-Net v1 .model file, or a bare state
    dict) to this project's checkpoint, for evaluate, infer and the fine-tune bundle's --pretrained.

    Every tensor of the authors' layout (conv_blocks_context, conv_blocks_localization, tu, seg_outputs,
    intermedia_prompt, fusion_layer) goes to its place in UniSeg with its spatial axes reversed (nnU-Net's z,y,x to
    MONAI's x,y,z); a missing, unused or misshapen tensor is an error naming it, and nothing is written.

    Args:
        checkpoint: the authors' checkpoint file.
        out: the checkpoint to write, default "model.pt".
        catalog: the tasks it was trained on, in the authors' task-id order, default "uniseg_11tasks".
        unsafe: unpickle anything in the file (only for a file you trust), default False: weights_only loading.
    Returns:
        the written checkpoint.
    """
    from .methods.uniseg.import_weights import import_authors_weights

    _setup_logging()
    return str(import_authors_weights(checkpoint, out, catalog=catalog, unsafe=bool(unsafe)))


def export(checkpoint: str, out: str = "models", formats: Any = "torchscript,onnx", catalog: str = "") -> list[str]:
    """Export a checkpoint of any method to TorchScript (``model.ts``) and ONNX (``model_<kind>.onnx`` per input kind).

    UniSeg and MedUniSeg take the task as an input: ``model(x, task_id)`` with ``x`` ``(B, C, *patch)`` and
    ``task_id`` a ``(1,)`` int64 tensor, and return ``(B, max(num_classes), *patch)`` logits whose channels beyond the
    task's classes hold the lowest float value (so softmax / argmax equal the eager network's); ONNX files are
    ``model_c<C>.onnx`` per input channel count (MedUniSeg: ``model_c<C>_<patch>.onnx`` per channel count and task
    patch, 2D and 3D). Hermes takes ``(x, task_ids, modality_id)`` instead (see its bundle's docs). Use them with a
    sliding window of the training patch.

    Args:
        checkpoint: model.pt written by `train` or the bundle.
        out: output folder, default "models".
        formats: "torchscript", "onnx" or both (comma-separated), default both.
        catalog: overrides the catalog stored in the checkpoint.
    Returns:
        the written files.
    """
    from .export import export_checkpoint

    _setup_logging()
    written = export_checkpoint(checkpoint, out, formats=[str(f) for f in as_list(formats)], catalog=catalog or None)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return [str(p) for p in written.values()]


def compare(
    datasets: Any,
    out: str = "compare",
    budget_minutes: float = 0.0,
    budget_iterations: int = 0,
    methods: Any = "uniseg,meduniseg,hermes,single",
    catalog: str = "",
    epochs: int = 10,
    val_fraction: float = 0.2,
    seed: int = 0,
    mirror: bool = False,
    device: str = "",
    num_workers: int = -1,
    cache_dir: str = "",
    config: Any = None,
    gpu_memory_gb: float = 10.0,
    probe_iterations: int = 20,
) -> str:
    """Which method for my data? Train UniSeg, MedUniSeg, Hermes and a single-task baseline (one network per task)
    for the same budget and score them on the same held-out cases: OUT/compare.md, compare.json, compare.png.

    The tasks compared are those every chosen method segments (UniSeg, Hermes and the baseline are 3D). A time
    budget is turned into iterations per method by a short timed probe, so every run is a complete run of its
    bundle's recipe; the baseline gets the same total budget, an equal share per task. The final weights are
    scored (Gaussian sliding window, overlap 0.5), with quick-look PNGs per method and task in OUT/runs/. Run the
    same command again to continue an interrupted comparison.

    Args:
        datasets: MSD v1 / nnU-Net v2 folders (or a folder of them, such as the demo collection), comma-separated.
        out: output folder, default "compare".
        budget_minutes: training minutes per method.
        budget_iterations: training iterations per method instead (give exactly one budget).
        methods: comma-separated, default "uniseg,meduniseg,hermes,single".
        catalog: catalog JSON or built-in name; default the folders' tasks.json, else `plan` of the data.
        epochs: epochs each budget is spread over (learning-rate schedule steps), default 10.
        val_fraction: held-out share of each task's cases, default 0.2.
        seed: default 0.
        mirror: mirroring test-time augmentation for every method, default False.
        device: default CUDA when available.
        num_workers: data-loader workers, default the bundles' (CPU count less 2, at most 16).
        cache_dir: preprocess the cases once into this folder for every run, default none (in RAM).
        config: further train.json entries for every run (JSON), e.g. --config '{"augment": false}'; not the
            budget's, the data's or the outputs' entries, which compare sets.
        gpu_memory_gb: GPU memory budget when the data has to be planned, default 10.
        probe_iterations: batches of the timed probe epoch that turns minutes into iterations, default 20.
    Returns:
        the path of compare.md.
    """
    from .compare import compare as run_comparison

    _setup_logging()
    report = run_comparison(
        datasets,
        out=out,
        budget_minutes=budget_minutes or None,
        budget_iterations=budget_iterations or None,
        methods=methods,
        catalog=catalog or None,
        epochs=epochs,
        val_fraction=val_fraction,
        seed=seed,
        mirror=mirror,
        device=device or None,
        num_workers=None if num_workers < 0 else num_workers,
        cache_dir=cache_dir or None,
        config=_config_entries(config),
        gpu_memory_gb=gpu_memory_gb,
        probe_iterations=probe_iterations,
    )
    print(report["table"])
    logger.info("comparison in %.0f s: %s, %s, %s", report["seconds"], *report["files"].values())
    return report["files"]["markdown"]


COMMANDS = {
    "demo-data": demo_data,
    "plan": plan,
    "prepare": prepare,
    "train": train,
    "evaluate": evaluate,
    "compare": compare,
    "infer": infer,
    "benchmark": benchmark,
    "package": package,
    "export": export,
    "import-weights": import_weights,
}


#: set to 1 (or pass --debug) for full tracebacks instead of one-line error messages
DEBUG_ENV = "UNISEG_DEBUG"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m uniseg_components`` and the ``uniseg`` script.

    An error ends the command with its message on stderr and exit status 1 (2 for a wrong command line); the full
    traceback with ``--debug`` or ``UNISEG_DEBUG=1``. Images that could not be segmented are listed after the others
    are done.
    """
    import os

    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        fire.Fire(COMMANDS, command=args, name="uniseg")
    except (Exception, KeyboardInterrupt) as e:
        if debug or isinstance(e, fire.core.FireExit):
            raise
        from .workflows import raise_root_cause

        try:
            raise_root_cause(e)
        except (Exception, KeyboardInterrupt) as cause:  # the message is what the user needs
            e = cause
        if isinstance(e, KeyboardInterrupt):
            print(f"uniseg {args[0] if args else ''}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        print(f"uniseg {args[0] if args else ''}: error: {e}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None

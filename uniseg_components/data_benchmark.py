# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``uniseg benchmark --model loader``, ``--model scale`` and ``--model infer``: the real-scale data path measured on
synthetic clinical-size CT (512 x 512 x 160 voxels of 0.8 x 0.8 x 2 mm, int16, a body, a liver-like organ and a
tumour), and the inference throughput over many studies.

* :func:`run_loader_benchmark`: batches/s of the bundles' real train pipeline (disk cache, task-balanced sampler,
  patch crop and augmentation) at the catalog's patch (halved per axis on a CPU), for 0 and the default number of
  DataLoader workers, beside the model's training-step rate at the same patch on the same machine: the loader must
  outpace the model.
* :func:`run_scale_benchmark`: peak resident memory of a short training run through the disk cache for 10 and 40
  cases (each run in a fresh process, preprocessing included): it must not grow with the number of cases; the same
  runs with the cases kept in RAM show the growth the disk cache avoids.
* :func:`run_inference_benchmark`: studies/s of ``uniseg infer`` on 1 and 2 ranks (``torchrun``) over the same
  studies, each a fresh command timed from start to exit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "write_synthetic_ct",
    "run_loader_benchmark",
    "format_loader_report",
    "run_scale_benchmark",
    "format_scale_report",
    "run_inference_benchmark",
    "format_inference_report",
]

logger = logging.getLogger(__name__)

#: clinical-size synthetic CT: shape and spacing (mm) of every case
CT_SHAPE = (512, 512, 160)
CT_SPACING = (0.8, 0.8, 2.0)


def write_synthetic_ct(
    folder: str | os.PathLike, n: int, shape: Sequence[int] = CT_SHAPE, spacing: Sequence[float] = CT_SPACING
) -> list[dict[str, str]]:
    """Write ``n`` synthetic CT cases (``case_XXX.nii.gz`` int16 HU + ``case_XXX_seg.nii.gz`` labels 0 background,
    1 organ, 2 tumour) into ``folder``; the organ moves from case to case. Existing files are kept.

    Returns:
        the items ``{"image", "label", "task": "liver"}``.
    """
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y, z = (np.linspace(-1, 1, s, dtype=np.float32) for s in shape)
    body2d = (x[:, None] / 0.85) ** 2 + (y[None, :] / 0.65) ** 2 < 1
    noise = np.random.default_rng(0).normal(0, 20, tuple(shape)).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    items = []
    for i in range(n):
        image, label = folder / f"case_{i:03d}.nii.gz", folder / f"case_{i:03d}_seg.nii.gz"
        items.append({"image": str(image), "label": str(label), "task": "liver"})
        if image.is_file() and label.is_file():
            continue
        cx, cy, cz = 0.25 + 0.01 * (i % 10), -0.1, 0.05 * (i % 5)
        organ = (
            ((x[:, None, None] - cx) / 0.35) ** 2
            + ((y[None, :, None] - cy) / 0.3) ** 2
            + ((z[None, None] - cz) / 0.6) ** 2
        ) < 1
        tumour = (
            ((x[:, None, None] - cx - 0.1) / 0.08) ** 2
            + ((y[None, :, None] - cy) / 0.08) ** 2
            + ((z[None, None] - cz) / 0.15) ** 2
        ) < 1
        lab = organ.astype(np.uint8) + (tumour & organ).astype(np.uint8)
        hu = np.where(body2d[..., None], 40.0, -1000.0) + 20.0 * organ + 30.0 * (lab == 2)
        hu = hu + np.roll(noise, i, axis=0)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(image))
        nib.save(nib.Nifti1Image(lab, affine), str(label))
    return items


def _liver_catalog(catalog: Any) -> Any:
    """The ``liver`` task of ``catalog`` (default the 11-task UniSeg catalog, the paper's spacing and patch)."""
    from .tasks import TaskCatalog

    cat = TaskCatalog.resolve(catalog or "uniseg_11tasks")
    name = "liver" if "liver" in cat else cat.names[0]
    return cat.select([name]), name


def run_loader_benchmark(
    catalog: Any = None,
    cases: int = 4,
    workers: Sequence[int] | None = None,
    batches: int = 12,
    batch_size: int = 2,
    repeats: int = 3,
    device: str | None = None,
    work_dir: str | os.PathLike | None = None,
    shape: Sequence[int] = CT_SHAPE,
    patch_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Batches/s of the train pipeline on synthetic clinical-size CT for several worker counts, and the model step.

    The cases are preprocessed once into a disk cache (timed: seconds per case); then, per worker count, a
    ``DataLoader`` over the bundles' training dataset (``cached_dataset`` with a disk cache) with their task-balanced
    batch sampler (foreground oversampling 0.33) and ``train_transforms`` (patch placement, rotation and scaling in
    one resampling, then the intensity augmentation) delivers ``batches`` batches;
    the rate is taken after the first batch (worker start-up excluded). The model figure is one UniSeg training step
    (SGD, Dice + CE, AMP on CUDA) at the same patch and batch, the median of ``repeats``.

    Args:
        catalog: default the 11-task UniSeg catalog (its ``liver`` task: 1.5 x 1.5 x 3 mm, patch 192 x 192 x 64).
        cases: synthetic cases, default 4.
        workers: worker counts, default ``[0, default_num_workers()]`` (and 1 when the default is 0).
        batches: batches timed per worker count, default 12.
        batch_size: default 2 (the paper's).
        repeats: model steps timed, default 3.
        device: the model's device, default CUDA when available.
        work_dir: where the synthetic cases and the cache go, default a temporary folder (removed).
        shape: voxels of each synthetic case, default 512 x 512 x 160.
        patch_size: the patch of both the loader and the model step, default the catalog's on CUDA and half of it
            per axis on CPU, as the methods' benchmarks (on a CPU the paper's patch needs about 18 GiB of RAM for the
            model step).
    """
    from monai.data import DataLoader

    from .benchmark import cpu_patch, default_device, environment, time_interleaved, train_step
    from .data import TaskBalancedBatchSampler, cached_dataset, default_num_workers
    from .methods.uniseg import UniSeg
    from .transforms import train_transforms

    cat, task = _liver_catalog(catalog)
    dev = default_device(device)
    if patch_size is None and dev.type == "cpu":
        from .networks import plan_from_catalog

        plan = plan_from_catalog(cat)
        patch_size = cpu_patch(cat[task].patch_size, plan.total_stride[: cat[task].dims], dev)
    if patch_size is not None:
        from .tasks import TaskCatalog

        spec = {**cat[task].to_dict(), "patch_size": list(patch_size)}
        plan = {**cat.plan, "patch_size": list(patch_size)} if cat.plan else None
        cat = TaskCatalog([spec], cat.name, plan, cat.description)
    default = default_num_workers()
    counts = sorted(set(workers if workers is not None else [0, default, 1 if default == 0 else default]))
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="uniseg-loader-")
    root = Path(work_dir or tmp.name)  # type: ignore[union-attr]
    try:
        t = time.perf_counter()
        items = write_synthetic_ct(root / "data", cases, shape)
        for it in items:
            it["task"] = task
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        ds = cached_dataset(items, train_transforms(cat), root / "cache", num_workers=max(counts), progress=False)
        pre_s = (time.perf_counter() - t) / len(items)
        rates = {}
        for w in counts:
            sampler = TaskBalancedBatchSampler.from_items(
                items, cat, batch_size, batches_per_task=batches + 1, oversample_foreground=0.33
            )
            loader = DataLoader(ds, batch_sampler=sampler, num_workers=w)
            it = iter(loader)
            next(it)
            t = time.perf_counter()
            n = sum(1 for _ in it)
            rates[w] = n / (time.perf_counter() - t)
            logger.info("loader: %d worker(s): %.2f batches/s", w, rates[w])
        net = UniSeg.from_catalog(cat).to(dev).train()
        patch = tuple(cat[task].patch_size)
        x = torch.randn(batch_size, cat[task].num_channels, *patch, device=dev)
        y = torch.randint(0, cat[task].num_classes, (batch_size, 1, *patch), device=dev).float()
        tid = torch.zeros(batch_size, dtype=torch.long, device=dev)
        (step_s,) = time_interleaved([train_step(net, x, y, dev.type == "cuda", task_id=tid)], repeats, 1, dev)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "catalog": cat.name,
        "task": task,
        **environment(dev),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "case_shape": list(shape),
        "case_spacing": list(CT_SPACING),
        "target_spacing": list(cat[task].spacing),
        "patch": list(patch),
        "batch_size": batch_size,
        "cases": cases,
        "write_s_per_case": write_s / cases,
        "preprocess_s_per_case": pre_s,
        "default_workers": default,
        "batches_per_s": {str(k): v for k, v in rates.items()},
        "model_step_s": step_s,
        "model_steps_per_s": 1.0 / step_s,
    }


def format_loader_report(res: dict[str, Any]) -> str:
    """The markdown table of :func:`run_loader_benchmark`."""
    from .benchmark import markdown_table

    rows = [
        ("machine", f"{res['device']}, {res['cpus']} CPU(s), torch {res['torch']}"),
        (
            "synthetic CT",
            f"{res['cases']} cases {'x'.join(map(str, res['case_shape']))} at {res['case_spacing']} mm -> "
            f"{res['target_spacing']} mm",
        ),
        ("preprocess once (disk cache)", f"{res['preprocess_s_per_case']:.1f} s/case"),
    ]
    for w, rate in res["batches_per_s"].items():
        tag = " (default)" if int(w) == res["default_workers"] else ""
        rows.append((f"loader, {w} worker(s){tag}", f"{rate:.2f} batches/s"))
    rows.append(
        (
            f"UniSeg training step, patch {'x'.join(map(str, res['patch']))}, batch {res['batch_size']}",
            f"{res['model_step_s']:.3f} s = {res['model_steps_per_s']:.2f} steps/s",
        )
    )
    rates = res["batches_per_s"]
    default = str(res["default_workers"])
    label, rate = ("default loader", rates[default]) if default in rates else ("fastest loader", max(rates.values()))
    rows.append((f"{label} / model step rate", f"{rate / res['model_steps_per_s']:.1f}x"))
    return markdown_table(rows)


_SCALE_RUN = """
import json, resource, sys
from uniseg_components.workflows import train
args = json.loads(sys.argv[1])
res = train(args["datalist"], catalog=args["catalog"], output_dir=args["out"], epochs=1,
            batches_per_task=args["batches"], cache_dir=args["cache"], num_workers=args["workers"], device="cpu")
print("RESULT " + json.dumps({
    "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "seconds": res["seconds"]}))
"""


def run_scale_benchmark(
    counts: Sequence[int] = (10, 40),
    batches: int = 4,
    workers: int | None = None,
    work_dir: str | os.PathLike | None = None,
    shape: Sequence[int] = CT_SHAPE,
    patch: Sequence[int] = (96, 96, 32),
    modes: Sequence[str] = ("disk", "ram"),
) -> dict[str, Any]:
    """Peak resident memory of one short epoch of the UniSeg bundle through the disk cache, for each case count, and
    for contrast with the cases kept in RAM (no ``cache_dir``, the demo's setting).

    The cases are :func:`write_synthetic_ct` volumes of the liver task at the paper's spacing (1.5 x 1.5 x 3 mm; a
    CPU-sized network plan, patch 96 x 96 x 32, since the measure is about the data); each count trains in a fresh
    process (``uniseg train --cache_dir``, preprocessing into an empty cache included), which reports its own peak
    RSS and the largest of its DataLoader workers'.

    Args:
        counts: case counts, default ``(10, 40)``.
        batches: training batches of the epoch, default 4.
        workers: DataLoader workers, default :func:`~uniseg_components.data.default_num_workers` (at least 1, so
            that the workers' memory is measured too).
        work_dir: where cases, caches and runs go, default a temporary folder (removed).
        shape: voxels of each synthetic case, default 512 x 512 x 160.
        patch: the training patch, default 96 x 96 x 32.
        modes: ``"disk"`` (``--cache_dir``) and / or ``"ram"``, default both.
    """
    from .data import default_num_workers
    from .io import write_json
    from .networks.plans import auto_plan
    from .tasks import TaskCatalog

    workers = max(1, default_num_workers()) if workers is None else int(workers)
    base = TaskCatalog.builtin("uniseg_11tasks")["liver"].to_dict()
    plan = auto_plan(patch, base["spacing"], base_features=16, max_features=128).to_dict()
    catalog = TaskCatalog([{**base, "id": 0, "patch_size": plan["patch_size"], "label_offset": None}], "scale", plan)
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="uniseg-scale-")
    root = Path(work_dir or tmp.name)  # type: ignore[union-attr]
    runs: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        items = write_synthetic_ct(root / "data", max(counts), shape)
        write_s = time.perf_counter() - t
        catalog.save(root / "tasks.json")
        for mode in modes:
            if mode not in ("disk", "ram"):
                raise ValueError(f"modes must be 'disk' and / or 'ram', got {mode!r}.")
            for n in counts:
                datalist = write_json(root / f"datalist_{n}.json", {"training": items[:n], "validation": []})
                cache = root / f"cache_{n}"
                args = {
                    "datalist": str(datalist),
                    "catalog": str(root / "tasks.json"),
                    "out": str(root / f"run_{mode}_{n}"),
                    "cache": str(cache) if mode == "disk" else None,
                    "batches": batches,
                    "workers": workers,
                }
                out = subprocess.run(
                    [sys.executable, "-c", _SCALE_RUN, json.dumps(args)], capture_output=True, text=True, check=False
                )
                if out.returncode != 0:
                    raise RuntimeError(f"the {n}-case run ({mode}) failed:\n{out.stderr[-3000:]}")
                line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
                cache_mb = sum(p.stat().st_size for p in cache.glob("*.pt")) / 2**20 if mode == "disk" else 0.0
                runs[f"{mode} {n}"] = {**json.loads(line[len("RESULT ") :]), "cache_mb": cache_mb}
                logger.info("scale: %s, %d cases: %s", mode, n, runs[f"{mode} {n}"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "case_shape": list(shape),
        "case_spacing": list(CT_SPACING),
        "workers": workers,
        "batches": batches,
        "write_s": write_s,
        "runs": runs,
    }


def format_scale_report(res: dict[str, Any]) -> str:
    """The markdown table of :func:`run_scale_benchmark`."""
    lines = [
        "| preprocessed cases | cases | disk cache | peak RSS, training process | peak RSS, largest worker | time |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in res["runs"].items():
        mode, n = key.split()
        where = "on disk (`--cache_dir`)" if mode == "disk" else "in RAM (no `--cache_dir`)"
        lines.append(
            f"| {where} | {n} | {r['cache_mb'] / 1024:.2f} GiB | {r['self_mb']:.0f} MiB | {r['children_mb']:.0f} MiB "
            f"| {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def run_inference_benchmark(
    images: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    task: str = "abdomen_ct",
    ranks: Sequence[int] = (1, 2),
    device: str | None = None,
    extra_args: Sequence[str] = (),
    work_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Studies per second of ``uniseg infer`` over a folder of studies, for each rank count: one process, or
    ``torchrun --nproc_per_node=N`` (each rank on its own GPU, or N CPU processes of one thread each, torchrun's
    default). Every run is a fresh command into an empty output folder, timed from start to exit (interpreter start,
    checkpoint load, the whole inference and the summary); the in-run rate from the summary leaves out the start.

    Args:
        images: the studies (anything ``infer`` takes: a NIfTI folder, a DICOM archive...), default the demo's
            ``task`` images (written to the work folder).
        checkpoint: default an untrained UniSeg of the demo catalog's 3D tasks (the speed does not depend on the
            weights).
        task: default ``"abdomen_ct"``.
        ranks: rank counts, default ``(1, 2)``.
        device: ``"cpu"`` or ``"cuda"``, default CUDA when available.
        extra_args: more ``infer`` arguments, e.g. ``("--dicom_seg",)``.
        work_dir: where the demo, checkpoint and outputs go, default a temporary folder (removed).
    """
    from .checkpoints import save_checkpoint
    from .demo import write_demo_collection
    from .io import read_json
    from .methods.uniseg import UniSeg
    from .tasks import TaskCatalog

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="uniseg-infer-bench-")
    root = Path(work_dir or tmp.name)  # type: ignore[union-attr]
    runs = []
    try:
        if images is None:
            demo = write_demo_collection(root / "demo", tasks=[task], overwrite=True)
            images = next(p for p in demo.iterdir() if p.is_dir()) / "imagesTr"
        if checkpoint is None:
            catalog = TaskCatalog.builtin("demo").select(dims=3)
            torch.manual_seed(0)
            checkpoint = save_checkpoint(root / "model.pt", UniSeg.from_catalog(catalog), catalog)
        for n in ranks:
            out = root / f"out_{n}"
            args = ["infer", str(checkpoint), str(images), "--task", task, "--out", str(out), *extra_args]
            launch = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={n}"]
            cmd = [sys.executable, *(launch if n > 1 else []), "-m", "uniseg_components", *args]
            if device == "cpu" or n == 1:  # several CUDA ranks: each takes its LOCAL_RANK's GPU
                cmd += ["--device", device]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - t
            summaries = sorted(out.glob("infer_summary_*.json"))
            if not summaries:
                raise RuntimeError(f"infer on {n} rank(s) wrote no summary:\n{proc.stderr[-3000:]}")
            s = read_json(summaries[0], "summary")
            threads = torch.get_num_threads() if n == 1 else int(os.environ.get("OMP_NUM_THREADS", 1))
            runs.append(
                {
                    "ranks": n,
                    "threads_per_rank": threads if device == "cpu" else None,
                    "studies": s["done"],
                    "failed": s["failed"],
                    "seconds": seconds,
                    "studies_per_s": s["done"] / seconds,
                    "in_run_studies_per_s": s["images_per_s"],
                }
            )
            logger.info("infer benchmark: %s", runs[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"device": device, "task": task, "images": str(images), "extra_args": list(extra_args), "runs": runs}


def format_inference_report(res: dict[str, Any]) -> str:
    """The markdown table of :func:`run_inference_benchmark`, with each rank count's speed-up over the first."""
    lines = [
        "| ranks | threads per rank | studies | failed | command time | studies/s | speed-up | studies/s in the run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = res["runs"][0]["studies_per_s"] if res["runs"] else 0.0
    for r in res["runs"]:
        threads = "-" if r["threads_per_rank"] is None else str(r["threads_per_rank"])
        lines.append(
            f"| {r['ranks']} | {threads} | {r['studies']} | {r['failed']} | {r['seconds']:.1f} s | "
            f"{r['studies_per_s']:.3f} | {r['studies_per_s'] / first if first else 0:.2f}x | "
            f"{r['in_run_studies_per_s']:.3f} |"
        )
    extra = " ".join(res["extra_args"])
    return (
        f"`infer` of {res['images']} ({res['task']}{', ' + extra if extra else ''}) on {res['device']}\n\n"
        + "\n".join(lines)
    )

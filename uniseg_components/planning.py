# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Plan a task catalog from the data: ``dataset.json`` files plus a fingerprint of every case (nnU-Net's rules).

``uniseg plan MSD_FOLDERS... --out DIR`` (:func:`plan`) reads each folder's ``dataset.json`` (MSD v1 or nnU-Net
v2, see :func:`~uniseg_components.data.read_msd_dataset`), fingerprints every case in parallel (voxel spacing
and shape in MONAI's RAS axis order, read from the headers; for tasks with a CT channel also a sample of the
foreground intensities) and writes ``DIR/tasks.json``, a catalog the user may read and edit, and
``DIR/fingerprint.json`` with the numbers it was planned from:

* **target spacing** per task (:func:`target_spacing`): the median spacing; when the data are anisotropic (the
  coarsest axis over 3x coarser than the others *and* fewer than a third as many voxels along it), the 10th
  percentile along the coarse axis instead, so that thin-slice cases are not thrown away;
* **modality** per channel, from the channel names (:data:`MODALITY_ALIASES`); **labels** from ``labels``;
* **one network plan** for all tasks (:func:`plan_network`): kernels and strides from the spacing anisotropy
  (:func:`~uniseg_components.networks.plans.auto_plan`), features 32 doubling to 320, and the largest patch with
  the shape of the data that fits ``gpu_memory_gb`` by :func:`estimate_memory_gib` (nnU-Net's search: start from
  a 256^3-voxel patch with the spacing's aspect, capped by the median shape, and shrink the axis that is largest
  relative to the median shape until it fits);
* **CT normalisation**: UniSeg's fixed [-325, 325] window (``ct_normalization="window"``, the default) or
  nnU-Net's (``"foreground"``: clip to the 0.5 / 99.5 percentiles of the foreground voxels, z-score with their
  mean and std), stored in the tasks' ``ct_window`` / ``ct_zscore``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .data import dataset_channels, dataset_labels, read_msd_dataset
from .io import image_files, load_nifti, write_json
from .networks.plans import UNetPlan, auto_plan
from .tasks import MODALITIES, TaskCatalog, TaskSpec, normalization_of

__all__ = [
    "MODALITY_ALIASES",
    "canonical_modality",
    "fingerprint_dataset",
    "target_spacing",
    "estimate_memory_gib",
    "plan_network",
    "plan_catalog",
    "plan",
    "catalog_for",
]

logger = logging.getLogger(__name__)

#: channel names used in MSD / nnU-Net ``dataset.json`` files (lower case) -> this project's modality names
MODALITY_ALIASES: dict[str, str] = {
    **{m.lower(): m for m in MODALITIES},
    "mri": "MR",
    "t1w": "T1",
    "t1gd": "T1c",
    "t1ce": "T1c",
    "t1-ce": "T1c",
    "t2w": "T2",
    "t2-flair": "FLAIR",
    "suv": "PET",
    "ultrasound": "US",
    "x-ray": "XR",
    "xray": "XR",
}

#: peak GPU memory of one training step per stored activation element (fp16 autocast, batch of 2): calibrated so
#: that UniSeg's paper plan (patch 192x192x64, features 32-320, batch 2) comes to the 6.4 GiB measured on an H200
#: (see docs/benchmarks.md); parameters count 16 bytes each (fp32 weights, gradients, momentum, fp16 copies)
ACTIVATION_BYTES = 2.25
PARAMETER_BYTES = 16
#: foreground voxels sampled per case for the CT intensity statistics (as nnU-Net)
FOREGROUND_SAMPLES = 10000
#: nnU-Net's rule: z-score inside the non-zero region when cropping to it keeps less than this share of the volume
NONZERO_MASK_BELOW = 0.75


def canonical_modality(name: str, where: str = "dataset.json") -> str:
    """This project's modality name for a channel name of a ``dataset.json`` (``"MRI"`` -> ``"MR"``, ``"t1gd"`` ->
    ``"T1c"``, ``"CT"`` -> ``"CT"``).

    Raises:
        ValueError: naming ``where`` and the known names, for a name that is not a modality (e.g. nnU-Net's
            ``"noNorm"``): edit the channel name in the file.
    """
    key = str(name).strip().lower()
    if key not in MODALITY_ALIASES:
        raise ValueError(
            f"{where}: channel name {name!r} is not a known modality; rename it in the file to one of "
            f"{sorted(MODALITIES)} (aliases: {sorted(set(MODALITY_ALIASES) - {m.lower() for m in MODALITIES})})."
        )
    return MODALITY_ALIASES[key]


# ---------------------------------------------------------------------------------------------- fingerprint
def _geometry(path: str) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """(spacing, spatial shape, channels) of a NIfTI file from its header, spatial axes in RAS order."""
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    zooms = tuple(float(z) for z in nib.affines.voxel_sizes(img.affine)[:3])  # from the affine, as MONAI resamples
    spatial = (shape + (1, 1))[:3]
    channels = shape[3] if len(shape) == 4 else 1
    axes = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
    spacing, size = [0.0] * 3, [0] * 3
    for i, a in enumerate(axes):
        spacing[a], size[a] = (zooms + (1.0,) * 3)[i], spatial[i]
    return tuple(spacing), tuple(size), channels


def _nonzero_fraction(arrays: Sequence[np.ndarray]) -> float:
    """The share of the image volume (the arrays of its files) inside the bounding box of its non-zero voxels (any
    channel): what cropping to the non-zero region keeps (1.0 when nothing would be cropped)."""
    mask: np.ndarray | None = None
    for a in arrays:
        nz = a != 0
        nz = nz.reshape(*nz.shape[:3], -1).any(axis=-1) if nz.ndim > 3 else nz  # channels last
        mask = nz if mask is None else mask | nz
    if mask is None or not mask.any():
        return 1.0
    others = [tuple(a for a in range(mask.ndim) if a != ax) for ax in range(mask.ndim)]
    box = [np.flatnonzero(mask.any(axis=o)) for o in others]
    return float(np.prod([b[-1] - b[0] + 1 for b in box]) / mask.size)


def _fingerprint_case(
    item: Mapping[str, Any], ct_channels: Sequence[int], seed: int, nonzero: bool = False
) -> dict[str, Any]:
    """Spacing and shape of one case (all its files must agree), for ``ct_channels`` foreground samples and, with
    ``nonzero``, the share of the volume its non-zero region's bounding box keeps (``nonzero_fraction``)."""
    files = image_files(item["image"])
    for p in (*files, item["label"]):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: file does not exist.")
    try:
        geo = {p: _geometry(p) for p in (*files, item["label"])}
    except Exception as e:  # nibabel's header errors of any kind
        raise ValueError(f"{files[0]}: cannot read the NIfTI header ({type(e).__name__}: {e}).") from e
    spacing, shape, _ = geo[files[0]]
    for p, (sp, sh, _) in geo.items():
        if not np.allclose(sp, spacing, rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"{p}: inconsistent spacings within the case: {list(sp)} mm, but {files[0]} has {list(spacing)} mm; "
                "the image, its channels and the label must share one voxel grid."
            )
        if sh != shape:
            raise ValueError(f"{p}: shape {list(sh)} differs from {list(shape)} of {files[0]} (same case).")
    out: dict[str, Any] = {"spacing": list(spacing), "shape": list(shape)}
    loaded: dict[str, np.ndarray] = {}

    def read(path: str) -> np.ndarray:  # each image file of the case is read at most once
        if path not in loaded:
            loaded[path] = np.asarray(load_nifti(path)[0])
        return loaded[path]

    if nonzero:
        out["nonzero_fraction"] = _nonzero_fraction([read(f) for f in files])
    if ct_channels:
        label, _ = load_nifti(item["label"])
        fg = np.flatnonzero(label.reshape(-1) > 0)
        rng = np.random.default_rng(seed)
        pick = rng.choice(fg, size=min(FOREGROUND_SAMPLES, fg.size), replace=False) if fg.size else fg
        whole = read(files[0]) if len(files) == 1 else None  # one file, channels last
        samples = []
        for c in ct_channels:
            data = read(files[c]) if whole is None else whole[..., c] if whole.ndim == 4 else whole
            samples.append(np.asarray(data).reshape(-1)[pick].astype(np.float64))
        out["ct_foreground"] = np.concatenate(samples) if samples else np.zeros(0)
    return out


def fingerprint_dataset(
    folder: str | os.PathLike, num_workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Read a dataset folder's ``dataset.json`` and fingerprint every training case.

    Args:
        folder: an MSD v1 or nnU-Net v2 folder.
        num_workers: threads reading headers and files, default ``None`` = the CPU count.
        progress: show a progress bar (tqdm), default ``True``.

    Returns:
        ``{"folder", "name", "modalities", "labels", "dims", "cases": [{"image", "label", "spacing", "shape"}],
        "ct_foreground": {"percentile_00_5", "percentile_99_5", "mean", "std", "samples"} or None,
        "nonzero_fraction"}``: the median share of the volume that cropping to the non-zero region keeps, for
        datasets with a z-scored (non-CT) channel (their images are read), else ``None``.

    Raises:
        FileNotFoundError, ValueError: naming ``dataset.json`` (no labels, unknown channel names, no cases) or the
        case file (missing, unreadable, spacings that differ within a case); all cases' problems together.
    """
    from tqdm.auto import tqdm

    folder = Path(folder).resolve()
    where = str(folder / "dataset.json")
    cases = read_msd_dataset(folder)
    labels = dataset_labels(folder)
    modalities = [canonical_modality(m, where) for m in dataset_channels(folder)]
    if not cases:
        raise ValueError(f"{where}: the dataset has no training cases.")
    ct = [c for c, m in enumerate(modalities) if normalization_of(m) == "ct"]
    zscored = any(normalization_of(m) == "zscore" for m in modalities)
    workers = max(1, int(num_workers or os.cpu_count() or 1))

    def one(i: int) -> dict[str, Any] | str:
        try:
            return _fingerprint_case(cases[i], ct, seed=i, nonzero=zscored)
        except (OSError, ValueError) as e:
            return str(e)

    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(one, range(len(cases))), total=len(cases), desc=folder.name, disable=not progress))
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise ValueError(f"{folder}: {len(problems)} case(s) cannot be planned:\n  - " + "\n  - ".join(problems))
    dims = 2 if all(r["shape"][2] == 1 for r in results) else 3  # type: ignore[index]
    out_cases = [
        {"image": c["image"], "label": c["label"], "spacing": r["spacing"][:dims], "shape": r["shape"][:dims]}
        for c, r in zip(cases, results)
    ]
    stats = None
    if ct:
        fg = np.concatenate([r["ct_foreground"] for r in results])  # type: ignore[index]
        if fg.size:
            stats = {
                "percentile_00_5": float(np.percentile(fg, 0.5)),
                "percentile_99_5": float(np.percentile(fg, 99.5)),
                "mean": float(fg.mean()),
                "std": float(fg.std()),
                "samples": int(fg.size),
            }
    return {
        "folder": str(folder),
        "name": folder.name,
        "modalities": modalities,
        "labels": labels,
        "dims": dims,
        "cases": out_cases,
        "ct_foreground": stats,
        "nonzero_fraction": float(np.median([r["nonzero_fraction"] for r in results])) if zscored else None,  # type: ignore[index]
    }


# ---------------------------------------------------------------------------------------------- spacing
def target_spacing(
    spacings: np.ndarray | Sequence[Sequence[float]], shapes: np.ndarray | Sequence[Sequence[int]]
) -> list[float]:
    """nnU-Net's target spacing: the per-axis median, except along the coarsest axis of anisotropic data.

    When the median spacing of the coarsest axis is more than 3x that of the others and the median number of
    voxels along it is under a third of the others', the target along it is the 10th percentile of the cases'
    spacings (but not finer than the other axes' largest target), so that resampling does not blur the many
    thin-slice cases into the few thick ones.

    Args:
        spacings: ``(N, dims)`` voxel spacings of the cases.
        shapes: ``(N, dims)`` voxel counts of the cases.

    Returns:
        the target spacing, ``dims`` floats.
    """
    sp, sh = np.asarray(spacings, dtype=float), np.asarray(shapes, dtype=float)
    target = np.median(sp, axis=0)
    size = np.median(sh, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    if others and target[coarse] > 3 * target[others].max() and size[coarse] * 3 < size[others].min():
        target[coarse] = max(float(np.percentile(sp[:, coarse], 10)), float(target[others].max()))
    return [round(float(t), 4) for t in target]


# ---------------------------------------------------------------------------------------------- network plan
def estimate_memory_gib(plan: UNetPlan, batch_size: int = 2, in_channels: int = 1, num_classes: int = 2) -> float:
    """Estimated peak GPU memory (GiB) of one fp16-autocast training step of the plan's U-Net.

    The count is nnU-Net's kind: every feature map kept for the backward pass (per encoder and decoder conv its
    output and its normalised output; per decoder stage the upsampled map, the concatenation and the segmentation
    output), times ``batch_size``, times :data:`ACTIVATION_BYTES`, plus :data:`PARAMETER_BYTES` per parameter. The
    constant is calibrated on UniSeg's paper plan (measured 6.4 GiB on an H200); the prompt / fusion modules of the
    three methods are small beside the feature maps.

    Args:
        plan: the network plan (its ``patch_size`` is the input).
        batch_size: default 2.
        in_channels: input channels, default 1.
        num_classes: output channels of the heads, default 2.
    """
    size, voxels = list(plan.patch_size), []
    elements = 0
    params = 0
    prev = in_channels
    for st, ks, f in zip(plan.strides, plan.kernel_sizes, plan.features):
        size = [s // t for s, t in zip(size, st)]
        voxels.append(math.prod(size))
        elements += plan.n_conv_per_stage * 2 * f * voxels[-1]
        params += math.prod(ks) * (prev * f + (plan.n_conv_per_stage - 1) * f * f)
        prev = f
    for level in range(plan.num_stages - 2, -1, -1):
        f, v = plan.features[level], voxels[level]
        elements += 3 * f * v + plan.n_conv_per_stage_decoder * 2 * f * v + num_classes * v
        k = math.prod(plan.decoder_kernel_sizes[plan.num_stages - 2 - level])  # type: ignore[index]
        up = math.prod(plan.strides[level + 1]) * plan.features[level + 1] * f
        params += up + k * f * f * (1 + plan.n_conv_per_stage_decoder)
    return (elements * batch_size * ACTIVATION_BYTES + params * PARAMETER_BYTES) / 2**30


def plan_network(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    gpu_memory_gb: float = 10.0,
    batch_size: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    base_features: int = 32,
    max_features: int | None = None,
    max_stages: int | None = None,
) -> UNetPlan:
    """The largest training patch of the data's shape whose U-Net fits ``gpu_memory_gb`` (nnU-Net's search).

    Start from a patch of 256^3 voxels (2048^2 in 2D) with the aspect of ``1 / spacing``, capped by
    ``median_shape``; derive kernels and strides with :func:`~uniseg_components.networks.plans.auto_plan`; while
    :func:`estimate_memory_gib` exceeds the budget, shrink the axis that is largest relative to the median shape
    by its total stride.

    Args:
        spacing: target spacing, MONAI axis order (2 or 3 values).
        median_shape: median case shape at that spacing, voxels.
        gpu_memory_gb: memory budget in GiB, default 10 (the UniSeg paper's GPU).
        batch_size: default 2.
        in_channels: largest input channel count, default 1.
        num_classes: head width (largest class count), default 2.
        base_features: default 32 (doubling per stage).
        max_features: default 320 (3D) / 512 (2D), as nnU-Net.
        max_stages: default 6 (3D) / 8 (2D).

    Raises:
        ValueError: when even the smallest patch does not fit the budget.
    """
    dims = len(spacing)
    max_features = max_features or (320 if dims == 3 else 512)
    max_stages = max_stages or (6 if dims == 3 else 8)
    aspect = 1.0 / np.asarray(spacing, dtype=float)
    start = aspect * ((256**3 if dims == 3 else 2048**2) / np.prod(aspect)) ** (1.0 / dims)
    shape = np.maximum(np.asarray(median_shape, dtype=float), 4)
    patch = [int(round(v)) for v in np.minimum(start, shape)]
    kw = dict(base_features=base_features, max_features=max_features, max_stages=max_stages)
    while True:
        net = auto_plan(patch, spacing, **kw)
        if estimate_memory_gib(net, batch_size, in_channels, num_classes) <= gpu_memory_gb:
            return net
        patch = list(net.patch_size)
        ratio = np.asarray(patch) / shape
        # axes that can still shrink by their total stride and stay >= 8 (downsampled at least once)
        ratio[[p - t < max(t, 8) for p, t in zip(patch, net.total_stride)]] = -np.inf
        if not np.isfinite(ratio).any():
            raise ValueError(
                f"no patch fits {gpu_memory_gb} GiB (smallest tried {patch} needs "
                f"{estimate_memory_gib(net, batch_size, in_channels, num_classes):.3g} GiB); raise --gpu_memory_gb."
            )
        axis = int(len(ratio) - 1 - np.argmax(ratio[::-1]))  # the last of equally large axes (nnU-Net's order)
        patch[axis] -= net.total_stride[axis]


def _task_name(folder: str, taken: set[str]) -> str:
    """A task name from a folder name: ``Task03_Liver`` / ``Dataset003_Liver`` -> ``liver``, unique."""
    base = re.sub(r"^(task|dataset)\d+_", "", folder, flags=re.IGNORECASE)
    base = re.sub(r"[^0-9a-z]+", "_", base.lower()).strip("_") or "task"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def plan_catalog(
    fingerprints: Sequence[Mapping[str, Any]],
    gpu_memory_gb: float = 10.0,
    batch_size: int = 2,
    ct_normalization: str = "window",
    name: str = "planned",
) -> TaskCatalog:
    """A catalog from dataset fingerprints (:func:`fingerprint_dataset`), one task per dataset in the order given.

    The network plan is planned (:func:`plan_network`) for the 3D tasks together (2D only when there is no 3D
    task): at the per-axis median of their target spacings and of their median shapes, for the largest channel
    and class counts. 3D tasks train on the plan's patch; each 2D task gets its own patch, planned at its spacing
    and shape and rounded to the plan's in-plane total stride.

    Args:
        fingerprints: one per dataset.
        gpu_memory_gb: memory budget of a training step, default 10.
        batch_size: default 2.
        ct_normalization: ``"window"`` (UniSeg's fixed [-325, 325] HU, default) or ``"foreground"`` (nnU-Net's:
            clip to the foreground's 0.5 / 99.5 percentiles, z-score with its mean and std).
        name: catalog name, default ``"planned"``.

    A dataset with z-scored (non-CT) channels whose crop to the non-zero region keeps less than 3/4 of the volume
    (median over cases) gets ``nonzero_mask``: z-score inside that region (nnU-Net's ``use_mask_for_norm`` rule,
    e.g. skull-stripped BraTS).

    Raises:
        ValueError: for an unknown ``ct_normalization`` or no fingerprints.
    """
    if ct_normalization not in ("window", "foreground"):
        raise ValueError(f"ct_normalization must be 'window' or 'foreground', got {ct_normalization!r}.")
    if not fingerprints:
        raise ValueError("plan_catalog: no datasets.")
    per_task = []
    for fp in fingerprints:
        sp = [c["spacing"] for c in fp["cases"]]
        sh = [c["shape"] for c in fp["cases"]]
        target = target_spacing(sp, sh)
        median = np.median(np.asarray(sh, float) * np.asarray(sp, float) / np.asarray(target), axis=0)
        per_task.append((fp, target, median))
    dims = 3 if any(fp["dims"] == 3 for fp, _, _ in per_task) else 2
    ref = [(t, m) for fp, t, m in per_task if fp["dims"] == dims]
    in_ch = max(len(fp["modalities"]) for fp in fingerprints)
    n_cls = max(len(fp["labels"]) for fp in fingerprints)
    net = plan_network(
        np.median([t for t, _ in ref], axis=0).tolist(),
        np.median([m for _, m in ref], axis=0).tolist(),
        gpu_memory_gb=gpu_memory_gb,
        batch_size=batch_size,
        in_channels=in_ch,
        num_classes=n_cls,
    )
    in_plane = net.total_stride[:2]
    tasks, taken = [], set()
    for i, (fp, target, median) in enumerate(per_task):
        if fp["dims"] == dims:
            patch = list(net.patch_size)
        else:  # a 2D task beside 3D ones: its own in-plane patch, divisible by the plan's in-plane stride
            own = plan_network(target, median, gpu_memory_gb, batch_size, len(fp["modalities"]), n_cls)
            patch = [max(s, (p // s) * s) for p, s in zip(own.patch_size, in_plane)]
        extra: dict[str, Any] = {}
        stats = fp.get("ct_foreground")
        if ct_normalization == "foreground" and stats:
            extra = {
                "ct_window": [stats["percentile_00_5"], stats["percentile_99_5"]],
                "ct_zscore": [stats["mean"], max(stats["std"], 1e-8)],
            }
        if fp.get("nonzero_fraction") is not None and fp["nonzero_fraction"] < NONZERO_MASK_BELOW:
            extra["nonzero_mask"] = True
        task_name = _task_name(fp["name"], taken)
        taken.add(task_name)
        tasks.append(
            TaskSpec(
                name=task_name,
                id=i,
                dims=fp["dims"],
                modalities=fp["modalities"],
                labels=fp["labels"],
                spacing=target,
                patch_size=patch,
                dataset=fp["name"],
                description=(
                    f"planned from {fp['folder']}: {len(fp['cases'])} cases, median shape "
                    f"{[int(round(v)) for v in median]} at the target spacing"
                ),
                **extra,
            )
        )
    return TaskCatalog(
        tasks,
        name=name,
        plan=net.to_dict(),
        description=(
            f"planned by uniseg plan for a {gpu_memory_gb:g} GiB training step (batch {batch_size}, estimated "
            f"{estimate_memory_gib(net, batch_size, in_ch, n_cls):.1f} GiB); CT normalisation: {ct_normalization}"
        ),
    )


def plan(
    dataset_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    gpu_memory_gb: float = 10.0,
    batch_size: int = 2,
    ct_normalization: str = "window",
    num_workers: int | None = None,
    name: str = "planned",
    progress: bool = True,
) -> Path:
    """Fingerprint dataset folders and write ``<out_dir>/tasks.json`` (the catalog) and ``fingerprint.json``.

    Args:
        dataset_dirs: MSD v1 / nnU-Net v2 folders, one task each.
        out_dir: output folder (created).
        gpu_memory_gb: memory budget of a training step in GiB, default 10.
        batch_size: default 2.
        ct_normalization: ``"window"`` (default) or ``"foreground"``, see :func:`plan_catalog`.
        num_workers: threads reading the cases, default the CPU count.
        name: catalog name, default ``"planned"``.
        progress: progress bars, default ``True``.

    Returns:
        the path of ``tasks.json``.

    Raises:
        FileNotFoundError, ValueError: naming the file (see :func:`fingerprint_dataset`); nothing is written then.
    """
    if isinstance(dataset_dirs, (str, os.PathLike)):
        dataset_dirs = [dataset_dirs]
    if not dataset_dirs:
        raise ValueError("plan: no dataset folders given.")
    fingerprints = [fingerprint_dataset(d, num_workers=num_workers, progress=progress) for d in dataset_dirs]
    catalog = plan_catalog(
        fingerprints, gpu_memory_gb=gpu_memory_gb, batch_size=batch_size, ct_normalization=ct_normalization, name=name
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fingerprint.json", {"datasets": fingerprints}, indent=1)
    path = catalog.save(out / "tasks.json")
    for t in catalog:
        logger.info(
            "plan: task %r (%s): %dD %s, spacing %s, patch %s",
            t.name,
            t.dataset,
            t.dims,
            list(t.modalities),
            list(t.spacing),
            list(t.patch_size),
        )
    p = catalog.plan or {}
    logger.info("plan: network features %s, strides %s; wrote %s", p.get("features"), p.get("strides"), path)
    return path


def catalog_for(
    roots: Sequence[str | os.PathLike],
    folders: Sequence[str | os.PathLike],
    catalog: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    **plan_kwargs: Any,
) -> str:
    """The catalog that ``prepare`` (and ``compare``) use for dataset folders: ``catalog`` when given; else the
    ``tasks.json`` inside the first folder given (as the demo collection has); else a new :func:`plan` of
    ``folders`` written to ``out_dir``.

    Args:
        roots: the folders as the user gave them (a collection folder or MSD folders).
        folders: the MSD folders they stand for.
        catalog: catalog JSON or built-in name, or ``None`` / ``""``.
        out_dir: where a planned catalog goes.
        plan_kwargs: passed to :func:`plan` (``gpu_memory_gb``, ``ct_normalization``...).

    Returns:
        the catalog (path or built-in name).
    """
    if catalog:
        return str(catalog)
    guess = Path(roots[0]) / "tasks.json"
    if guess.is_file():
        return str(guess)
    logger.info("no catalog given and no %s: planning one from the data", guess)
    return str(plan(folders, out_dir, **plan_kwargs))

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Datasets of many partially labelled tasks: MSD folders -> validated datalist; task-balanced batch sampler.

* :func:`read_msd_dataset` reads one Medical Segmentation Decathlon style folder (``dataset.json``,
  ``imagesTr/``, ``labelsTr/``).
* :func:`prepare` maps several such folders to the tasks of a :class:`~uniseg_components.tasks.TaskCatalog`,
  checks every case (files load, channel count, spatial rank and shape, label values) and writes
  ``datalist.json`` + ``tasks.json``; :func:`load_datalist` reads them back.
* :class:`TaskBalancedBatchSampler` draws UniSeg's batches: one task per batch, every task equally often per
  epoch, different batches on each distributed rank.
* :func:`cached_dataset` gives the bundles' datasets: in RAM (small collections) or preprocessed once to disk
  (:class:`DiskCacheDataset`, any size); :func:`default_num_workers` the DataLoader workers for this machine.

File layout conventions (the same as the transforms'): a 3D image is ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (MSD's
channel-last 4-D NIfTI); a 2D image is ``(X, Y)``, ``(X, Y, 1)`` or ``(X, Y, 1, C)``; labels have the
image's spatial shape (a trailing singleton axis is allowed).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait, Transform, apply_transform
from torch.utils.data import Sampler

from .io import as_list, image_files, image_stem, load_nifti, read_json, write_json
from .tasks import TaskCatalog, TaskSpec
from .transforms import FORCE_FG_KEY

__all__ = [
    "read_split",
    "case_id",
    "msd_folders",
    "dataset_folders",
    "read_msd_dataset",
    "dataset_channels",
    "dataset_labels",
    "prepare",
    "load_datalist",
    "TaskBalancedBatchSampler",
    "default_num_workers",
    "transform_hash",
    "item_hash",
    "DiskCacheDataset",
    "PatchDataset",
    "cached_dataset",
]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist.json"
CATALOG_NAME = "tasks.json"
#: tolerance (mm) when comparing the affines of an image and its label
AFFINE_ATOL = 1e-3


# ---------------------------------------------------------------------------------------------- MSD folders
def _read_dataset_json(folder: str | os.PathLike) -> dict[str, Any]:
    """Load ``<folder>/dataset.json`` (MSD v1 or nnU-Net v2) and check it is an object; errors name the file."""
    path = Path(folder) / "dataset.json"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist.")
    meta = read_json(path, "dataset file", "an MSD or nnU-Net v2 folder needs a dataset.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(meta).__name__}.")
    return meta


def _nnunet_v1_channels(root: Path, image: str, meta: Mapping[str, Any]) -> list[str] | None:
    """nnU-Net v1 raw data lists ``./imagesTr/x.nii.gz`` but stores ``imagesTr/x_0000.nii.gz``, one file per entry
    of ``modality``: those files when the listed one is absent and the first channel file exists, else ``None``."""
    listed = root / image
    if listed.exists() or not listed.name.endswith(".nii.gz"):
        return None
    stem = listed.name[: -len(".nii.gz")]
    modality = meta.get("modality")
    count = len(modality) if isinstance(modality, dict) and modality else 1
    files = [listed.with_name(f"{stem}_{c:04d}.nii.gz") for c in range(count)]
    return [str(f.resolve()) for f in files] if files[0].exists() else None


def _msd_cases(root: Path, meta: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """MSD v1 ``training``: ``[{"image": file or [files], "label": file}]`` relative to the folder; nnU-Net v1 raw
    data (the same list, with one ``<case>_<XXXX>.nii.gz`` file per channel on disk) too."""
    out = []
    for i, item in enumerate(meta["training"]):
        image = item.get("image") if isinstance(item, dict) else None
        images_ok = isinstance(image, str) or (
            isinstance(image, list) and image and all(isinstance(p, str) for p in image)
        )
        if not (images_ok and isinstance(item.get("label"), str)):
            raise ValueError(f"{str(path)!r}: training[{i}] must be {{'image': path, 'label': path}}, got {item!r}.")
        files = [str((root / p).resolve()) for p in ([image] if isinstance(image, str) else image)]
        v1 = _nnunet_v1_channels(root, image, meta) if isinstance(image, str) else None
        if v1 is not None:
            files, image = v1, v1
        one = isinstance(image, str) or len(files) == 1
        out.append({"image": files[0] if one else files, "label": str((root / item["label"]).resolve())})
    return out


def _nnunet_cases(root: Path, meta: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """nnU-Net v2 layout: ``labelsTr/<case><file_ending>`` and one ``imagesTr/<case>_<XXXX><file_ending>`` per
    channel of ``channel_names`` (or the explicit ``dataset`` mapping of nnU-Net v2)."""
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta["channel_names"]
    if (
        not isinstance(channels, dict)
        or not channels
        or sorted(channels, key=str) != sorted(map(str, range(len(channels))))
    ):
        raise ValueError(
            f"{str(path)!r}: 'channel_names' must be an object with keys '0', '1', ..., like {{'0': 'CT'}}."
        )
    if isinstance(meta.get("dataset"), dict):
        out = []
        for case, entry in sorted(meta["dataset"].items()):
            if not (isinstance(entry, dict) and isinstance(entry.get("images"), list) and "label" in entry):
                raise ValueError(f"{str(path)!r}: dataset[{case!r}] must be {{'images': [...], 'label': path}}.")
            files = [str((root / p).resolve()) for p in entry["images"]]
            out.append(
                {"image": files[0] if len(files) == 1 else files, "label": str((root / entry["label"]).resolve())}
            )
        return out
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is an nnU-Net v2 dataset.json but {str(labels_dir)!r} does not exist.")
    out = []
    for label in sorted(labels_dir.glob(f"*{ending}")):
        case = label.name[: -len(ending)]
        files = [str((root / "imagesTr" / f"{case}_{int(c):04d}{ending}").resolve()) for c in sorted(channels, key=int)]
        out.append({"image": files[0] if len(files) == 1 else files, "label": str(label.resolve())})
    return out


def msd_folders(root: str | os.PathLike) -> list[Path]:
    """The MSD-format task folders (sub-folders holding a ``dataset.json``) of ``root``, sorted by name."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / "dataset.json").is_file())


def dataset_folders(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The MSD / nnU-Net folders that command-line paths stand for: each path itself when it holds ``dataset.json``,
    else its sub-folders that do (:func:`msd_folders`).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder with no ``dataset.json`` in it or below it.
    """
    out: list[str] = []
    for p in map(Path, paths):
        if (p / "dataset.json").is_file():
            out.append(str(p))
        elif p.is_dir():
            subs = [str(d) for d in msd_folders(p)]
            if not subs:
                raise FileNotFoundError(f"{str(p)!r} holds no dataset.json, nor do its sub-folders.")
            out += subs
        else:
            raise FileNotFoundError(f"dataset folder {str(p)!r} does not exist.")
    return out


def read_msd_dataset(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the training cases of an MSD v1, nnU-Net v1 or nnU-Net v2 folder.

    Args:
        folder: a folder with ``dataset.json``. MSD v1: keys ``modality``, ``labels``, ``training`` (a list of
            ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` relative to the folder; the image
            is one file, channels last). nnU-Net v1 raw data (what the UniSeg authors' conversion scripts write):
            the same, with ``imagesTr/x_0000.nii.gz``, ``x_0001.nii.gz``... (one per ``modality`` entry) on disk in
            place of the listed ``x.nii.gz``. nnU-Net v2: keys ``channel_names``, ``labels``, ``file_ending`` (default
            ``".nii.gz"``) and no ``training`` list: the cases are the files of ``labelsTr/``, with one image file
            ``imagesTr/<case>_<XXXX><file_ending>`` per channel (or the ``dataset`` mapping when present).

    Returns:
        ``[{"image": abs_path or [abs_path per channel], "label": abs_path}, ...]`` in the order of
        ``dataset.json`` (nnU-Net v2: sorted by case); files are not checked here, see :func:`prepare`.

    Raises:
        FileNotFoundError: when the folder or its ``dataset.json`` is missing.
        ValueError: when ``dataset.json`` is not valid JSON or in neither layout (naming the file).
    """
    root = Path(folder).resolve()
    meta = _read_dataset_json(root)
    path = root / "dataset.json"
    if isinstance(meta.get("training"), list):
        return _msd_cases(root, meta, path)
    if "channel_names" in meta:
        return _nnunet_cases(root, meta, path)
    raise ValueError(
        f"{str(path)!r} has neither a 'training' list (MSD: {{'modality', 'labels', 'training': [{{'image', "
        f"'label'}}, ...]}}) nor 'channel_names' (nnU-Net v2: {{'channel_names', 'labels', 'file_ending'}}); keys "
        f"found: {sorted(meta)}."
    )


def dataset_channels(folder: str | os.PathLike) -> list[str]:
    """The channel names of a dataset folder: MSD's ``modality`` or nnU-Net v2's ``channel_names``, in channel order.

    Raises:
        ValueError: naming ``dataset.json`` when it has neither, or the keys are not ``"0"``, ``"1"``, ...
    """
    meta, path = _read_dataset_json(folder), Path(folder) / "dataset.json"
    names = meta.get("channel_names", meta.get("modality"))
    if not isinstance(names, dict) or not names:
        raise ValueError(f"{str(path)!r} names no channels: expected 'modality' (MSD) or 'channel_names' (nnU-Net v2).")
    if sorted(names, key=str) != sorted(str(i) for i in range(len(names))):
        raise ValueError(f"{str(path)!r}: channel keys must be '0', '1', ..., got {sorted(names)}.")
    return [str(names[str(i)]) for i in range(len(names))]


def dataset_labels(folder: str | os.PathLike) -> list[str]:
    """The class names of a dataset folder, index 0 first, from ``labels`` in either layout: MSD ``{"0":
    "background", "1": "liver"}`` or nnU-Net v2 ``{"background": 0, "liver": 1}``.

    Raises:
        ValueError: naming ``dataset.json`` when ``labels`` is missing, the values are not dense from 0, or an
            nnU-Net v2 region (a list of values) is used.
    """
    meta, path = _read_dataset_json(folder), Path(folder) / "dataset.json"
    labels = meta.get("labels")
    if not isinstance(labels, dict) or len(labels) < 2:
        raise ValueError(
            f"{str(path)!r} has no 'labels' with a background and at least one class (MSD: {{'0': 'background', "
            f"'1': 'liver'}}; nnU-Net v2: {{'background': 0, 'liver': 1}}); got {labels!r}."
        )
    if all(isinstance(k, str) and k.lstrip("-").isdigit() for k in labels):  # MSD: value -> name
        by_value = {int(k): str(v) for k, v in labels.items()}
    else:  # nnU-Net v2: name -> value
        regions = [k for k, v in labels.items() if not isinstance(v, int)]
        if regions:
            raise ValueError(
                f"{str(path)!r}: label(s) {regions} are nnU-Net v2 regions (lists of values); only plain integer "
                "labels are supported."
            )
        by_value = {int(v): str(k) for k, v in labels.items()}
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(f"{str(path)!r}: label values must be dense from 0, got {sorted(by_value)}.")
    return [by_value[i] for i in range(len(by_value))]


def _load_array(path: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """Load a NIfTI file completely, gzip CRC and length verified (:func:`uniseg_components.io.load_nifti`);
    return (array, affine, problem)."""
    if not os.path.isfile(path):
        return None, None, "file does not exist"
    try:
        array, affine = load_nifti(path)
        return array, affine, None
    except ValueError as e:  # damaged gzip, header or size errors
        cause = e.__cause__ or e
        return None, None, f"cannot be read ({type(cause).__name__}: {cause})"


def _split_image_shape(shape: tuple[int, ...], dims: int) -> tuple[tuple[int, ...], int] | None:
    """(spatial shape, channels) of an image file of a ``dims``-D task, or ``None`` when the layout is wrong."""
    if dims == 3:
        if len(shape) == 3:
            return shape, 1
        if len(shape) == 4:
            return shape[:3], shape[3]
        return None
    if len(shape) == 2:
        return shape, 1
    if len(shape) == 3 and shape[2] == 1:
        return shape[:2], 1
    if len(shape) == 4 and shape[2] == 1:
        return shape[:2], shape[3]
    return None


def _load_channels(paths: Sequence[str], t: str) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Load an image stored as one file per channel (nnU-Net v2) and stack it channels last, as MSD stores it:
    ``(X, Y, Z, C)``, or ``(X, Y, 1, C)`` for 2D files. The files must share one shape and one affine."""
    problems: list[str] = []
    arrays, affines = [], []
    for p in paths:
        arr, affine, err = _load_array(p)
        if err:
            problems.append(f"{p} ({t}): image {err}.")
        arrays.append(arr)
        affines.append(affine)
    if problems:
        return None, None, problems
    for p, arr, affine in zip(paths[1:], arrays[1:], affines[1:]):
        if arr.shape != arrays[0].shape:
            problems.append(f"{p} ({t}): channel file shape {arr.shape} differs from {arrays[0].shape} ({paths[0]}).")
        elif not np.allclose(affine, affines[0], atol=AFFINE_ATOL):
            problems.append(
                f"{p} ({t}): inconsistent spacing/affine within the case: {np.round(affine[:3], 4).tolist()} differs "
                f"from {np.round(affines[0][:3], 4).tolist()} ({paths[0]}); all channel files must share one grid."
            )
    if problems:
        return None, None, problems
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    return np.stack(arrays, axis=-1), affines[0], []


def _check_case(item: Mapping[str, Any], task: TaskSpec, check_files: bool) -> list[str]:
    """All problems of one case, each naming the file, the task and what was expected."""
    problems: list[str] = []
    img_path, lab_path = item["image"], item["label"]
    img_paths = image_files(img_path)
    t = f"task {task.name!r}"
    if not check_files:
        for p in (*img_paths, lab_path):
            if not os.path.isfile(p):
                problems.append(f"{p} ({t}): file does not exist.")
        return problems
    if isinstance(img_path, str):
        img, img_affine, err = _load_array(img_path)
        if err:
            problems.append(f"{img_path} ({t}): image {err}.")
    else:
        img, img_affine, errs = _load_channels(img_paths, t)
        problems += errs
        img_path = img_paths[0]
    lab, lab_affine, lerr = _load_array(lab_path)
    if lerr:
        problems.append(f"{lab_path} ({t}): label {lerr}.")
    spatial = None
    if img is not None:
        split = _split_image_shape(tuple(img.shape), task.dims)
        if split is None:
            layout = "(X, Y, Z) or (X, Y, Z, C)" if task.dims == 3 else "(X, Y), (X, Y, 1) or (X, Y, 1, C)"
            problems.append(
                f"{img_path} ({t}): expected a {task.dims}D image {layout} with {task.num_channels} channel(s), "
                f"got an array of shape {tuple(img.shape)}."
            )
        else:
            spatial, channels = split
            if channels != task.num_channels:
                problems.append(
                    f"{img_path} ({t}): expected {task.num_channels} channel(s) ({', '.join(task.modalities)}), "
                    f"got {channels} (shape {tuple(img.shape)})."
                )
        if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
            problems.append(f"{img_path} ({t}): the image contains {int((~np.isfinite(img)).sum())} NaN/Inf voxel(s).")
    if lab is not None:
        lshape = tuple(lab.shape)
        while len(lshape) > task.dims and lshape[-1] == 1:  # (X, Y, Z, 1) or (X, Y, 1)
            lshape = lshape[:-1]
        if spatial is not None and lshape != tuple(spatial):
            problems.append(
                f"{lab_path} ({t}): label shape {tuple(lab.shape)} does not match the image's spatial shape "
                f"{tuple(spatial)} ({img_path})."
            )
        elif len(lshape) != task.dims:
            problems.append(f"{lab_path} ({t}): expected a {task.dims}D label, got shape {tuple(lab.shape)}.")
        elif img_affine is not None and not np.allclose(img_affine, lab_affine, atol=AFFINE_ATOL):
            problems.append(
                f"{lab_path} ({t}): the label's affine {np.round(lab_affine[:3], 4).tolist()} differs from the "
                f"image's {np.round(img_affine[:3], 4).tolist()} ({img_path}); they must share one voxel grid."
            )
        problems += _check_label_values(lab, lab_path, task)
    return problems


def _check_label_values(lab: np.ndarray, path: str, task: TaskSpec) -> list[str]:
    """Integer values in [0, num_classes): min/max for integer arrays, ``np.unique`` only when needed."""
    t = f"task {task.name!r}"
    if lab.size == 0:
        return [f"{path} ({t}): the label is empty."]
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.isfinite(lab).all():
            return [f"{path} ({t}): the label contains NaN/Inf."]
        if not np.array_equal(lab, np.round(lab)):
            vals = np.unique(lab[lab != np.round(lab)])[:10].tolist()
            return [f"{path} ({t}): label values must be integers, got e.g. {vals}."]
    lo, hi = lab.min(), lab.max()
    if lo < 0 or hi >= task.num_classes:
        vals = [int(v) if float(v).is_integer() else float(v) for v in np.unique(lab)[:20]]
        return [
            f"{path} ({t}): label values must be in [0, {task.num_classes}) for classes {list(task.labels)}, "
            f"got values {vals}."
        ]
    return []


class _SplitUnpickler(pickle.Unpickler):
    """Unpickles nnU-Net's ``splits_final.pkl`` (a list of dicts of numpy string arrays) and nothing else: a pickle
    can run any code it names, so only the classes such a file needs are allowed."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of an nnU-Net split file")
        return super().find_class(module, name)


def read_split(paths: str | os.PathLike | Sequence[str | os.PathLike], fold: int = 0) -> dict[str, set[str]]:
    """The training and validation case identifiers of one fold of nnU-Net split files: ``splits_final.json``
    (nnU-Net v2: a list of ``{"train": [...], "val": [...]}``, one per fold) or ``splits_final.pkl`` (nnU-Net v1 and
    UniSeg: the same as a pickle of lists or numpy arrays, read with only those classes allowed). Several files (one
    per dataset) are joined. A case in both lists of the fold is kept in both (with a warning), as nnU-Net would use
    it: the authors' ``splits_final_11_tasks.pkl`` has two such cases.

    Args:
        paths: one split file or several (a list, or comma-separated).
        fold: the fold index, default 0.

    Returns:
        ``{"train": {case ids}, "val": {case ids}}``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not a split file, or has no fold ``fold``; the message names it.
    """
    out: dict[str, set[str]] = {"train": set(), "val": set()}
    for path in [Path(p) for p in (as_list(paths) if not isinstance(paths, os.PathLike) else [paths])]:
        if not path.is_file():
            raise FileNotFoundError(f"split file {str(path)!r} does not exist.")
        try:
            if path.suffix == ".pkl":
                with open(path, "rb") as f:
                    folds = _SplitUnpickler(f).load()
            else:
                folds = read_json(path, "split file")
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
            raise ValueError(f"split file {str(path)!r} is not an nnU-Net splits_final.pkl ({e}).") from e
        if not isinstance(folds, list) or not all(isinstance(f, Mapping) and {"train", "val"} <= set(f) for f in folds):
            raise ValueError(
                f"split file {str(path)!r}: expected a list of folds, each with 'train' and 'val' case lists "
                "(nnU-Net's splits_final.json / .pkl)."
            )
        if not 0 <= fold < len(folds):
            raise ValueError(f"split file {str(path)!r} has {len(folds)} fold(s) (0-{len(folds) - 1}); fold {fold}?")
        for key in ("train", "val"):
            out[key] |= {str(c) for c in np.asarray(folds[fold][key]).ravel().tolist()}
    both = sorted(out["train"] & out["val"])
    if both:  # the authors' splits_final_11_tasks.pkl has two: follow the file, as nnU-Net does
        logger.warning(
            "split file(s) %s, fold %d: %d case(s) are in both 'train' and 'val' (%s); they are used for both, as "
            "nnU-Net does.", paths, fold, len(both), both[:5],
        )  # fmt: skip
    return out


def case_id(item: Mapping[str, Any]) -> str:
    """nnU-Net's case identifier of a datalist item: its label file's name without extension (``liver_001``)."""
    return image_stem(item["label"])


def _split(items: list[dict[str, str]], val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Seeded split of one task's items; >= 1 validation case when there are >= 2 cases and val_fraction > 0."""
    n = len(items)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    order = rng.permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


def prepare(
    dataset_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    catalog: TaskCatalog | str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    tasks: Mapping[str, str] | None = None,
    check_files: bool = True,
    select_present: bool = False,
    num_workers: int = 1,
    log_every: int = 50,
    split: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any] | None = None,
    fold: int = 0,
) -> Path:
    """Validate MSD-format folders against a catalog and write ``datalist.json`` + ``tasks.json``.

    Each folder is mapped to a task: by ``tasks[folder_name]`` when given, else by the catalog task whose
    ``dataset`` equals the folder name. Every case is then checked (with ``check_files=True``, the default):
    image and label exist and load completely with nibabel (a truncated or corrupt ``.gz`` is caught); the
    image has ``task.dims`` spatial axes (see the module docstring for the layouts) and one channel per task
    modality; no NaN/Inf in the image; the label has the image's spatial shape, the image's affine (within
    1e-3 mm) and integer values in ``[0, task.num_classes)``. All problems of all folders are collected and
    raised together as one ``ValueError``, and then nothing is written. A mismatch between ``dataset.json``'s
    ``labels`` / ``modality`` counts and the task is only logged as a warning (the checks trust the files).

    On success, writes (atomically: temporary file + ``os.replace``):

    * ``<out_dir>/tasks.json``: the catalog. By default the full catalog, unchanged, so that task ids stay those
      of the given catalog (checkpoints and built-in catalogs agree); tasks without data simply get no batches
      from :class:`TaskBalancedBatchSampler`. ``select_present=True`` writes ``catalog.select(present tasks)``
      instead (ids renumbered densely); the datalist refers to tasks by name, so it is valid either way.
    * ``<out_dir>/datalist.json``: ``{"catalog": "tasks.json", "training": [...], "validation": [...]}`` with
      items ``{"image": abs_path, "label": abs_path, "task": name}``. The split is per task and seeded: a
      fraction ``val_fraction`` of each task's cases (rounded; at least one when the task has >= 2 cases and
      ``val_fraction > 0``, never all of them) goes to validation. With ``split``, fold ``fold`` of nnU-Net's split
      file(s) decides instead (:func:`read_split`; cases by :func:`case_id`), so that models are evaluated on the
      authors' folds; every case must be in the fold's ``train`` or ``val`` list.

    Args:
        dataset_dirs: one MSD folder or a sequence of them.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        out_dir: output folder (created).
        val_fraction: validation fraction per task, in [0, 1), default ``0.2``.
        seed: split seed, default ``0``.
        tasks: ``{folder_name: task_name}`` overriding the catalog's ``dataset`` fields, default ``None``.
        check_files: load and check every file (default ``True``); ``False`` only checks that files exist.
        select_present: write only the tasks that have data, renumbered, default ``False``.
        num_workers: threads reading files, default ``1`` (nibabel's gzip decoding releases the GIL).
        log_every: log progress every this many cases, default ``50``.
        split: nnU-Net ``splits_final.json`` / ``.pkl`` file(s) for every folder (case ids unique across them, as
            in UniSeg's merged dataset), or ``{folder name: file(s)}`` (nnU-Net's one split per dataset; folders
            left out keep the seeded split), default ``None`` (the seeded split).
        fold: the fold of ``split``, default ``0``.

    Returns:
        The path of ``datalist.json``.

    Raises:
        ValueError: listing every problem found (or for bad arguments).
    """
    catalog = TaskCatalog.resolve(catalog)
    if isinstance(dataset_dirs, (str, os.PathLike)):
        dataset_dirs = [dataset_dirs]
    dataset_dirs = [Path(p).resolve() for p in dataset_dirs]
    if not dataset_dirs:
        raise ValueError("prepare: no dataset folders given.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    tasks = dict(tasks or {})
    by_dataset = {t.dataset: t for t in catalog if t.dataset}

    problems: list[str] = []
    unused = sorted(set(tasks) - {p.name for p in dataset_dirs})
    if unused:
        problems.append(f"tasks= maps folder name(s) {unused} that are not among the dataset folders given.")
    cases: list[tuple[dict[str, str], TaskSpec]] = []
    seen_tasks: dict[str, Path] = {}
    for folder in dataset_dirs:
        name = folder.name
        if name in tasks:
            try:
                task = catalog[tasks[name]]
            except KeyError as e:
                problems.append(f"{folder}: {e}")
                continue
        elif name in by_dataset:
            task = by_dataset[name]
        else:
            problems.append(
                f"{folder}: no task of catalog {catalog.name!r} has dataset {name!r}; known datasets: "
                f"{sorted(by_dataset)}; map the folder explicitly with tasks={{{name!r}: '<task name>'}}."
            )
            continue
        if task.name in seen_tasks:
            problems.append(f"{folder}: task {task.name!r} is already given by {seen_tasks[task.name]}.")
            continue
        seen_tasks[task.name] = folder
        try:
            meta = _read_dataset_json(folder)
            items = read_msd_dataset(folder)
        except (OSError, ValueError) as e:
            problems.append(f"{folder} (task {task.name!r}): {e}")
            continue
        channels_key = "channel_names" if "channel_names" in meta else "modality"
        for key, expected in (("labels", task.num_classes), (channels_key, task.num_channels)):
            if isinstance(meta.get(key), dict) and len(meta[key]) != expected:
                logger.warning(
                    "%s: dataset.json lists %d %s (%s) but task %r has %d; the files are checked against the task.",
                    folder,
                    len(meta[key]),
                    key,
                    list(meta[key].values()),
                    task.name,
                    expected,
                )
        if not items:
            problems.append(f"{folder / 'dataset.json'} (task {task.name!r}): the 'training' list is empty.")
        cases += [(it, task) for it in items]

    total = len(cases)
    logger.info("prepare: checking %d case(s) of %d folder(s).", total, len(dataset_dirs))

    def check(i: int) -> list[str]:
        item, task = cases[i]
        out = _check_case(item, task, check_files)
        if log_every and (i + 1) % log_every == 0:
            logger.info("prepare: checked %d/%d cases.", i + 1, total)
        return out

    if num_workers > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            results = list(pool.map(check, range(total)))
    else:
        results = [check(i) for i in range(total)]
    for r in results:
        problems += r
    if problems:
        raise ValueError(
            f"prepare found {len(problems)} problem(s) in {len(dataset_dirs)} dataset folder(s); nothing was "
            "written:\n  - " + "\n  - ".join(problems)
        )

    folds: dict[str, dict[str, set[str]]] = {}  # task name -> its fold
    if split:
        by_folder = dict(split) if isinstance(split, Mapping) else {p.name: split for p in dataset_dirs}
        unknown = sorted(set(by_folder) - {p.name for p in dataset_dirs})
        if unknown:
            raise ValueError(f"prepare: split files are given for folder(s) {unknown}, which are not dataset folders.")
        source = {name: str(files if isinstance(files, (str, os.PathLike)) else as_list(files)) for name, files in
                  by_folder.items()}  # fmt: skip
        read: dict[str, dict[str, set[str]]] = {}  # each split file (or list of files) read once
        for name, files in by_folder.items():
            if source[name] not in read:
                read[source[name]] = read_split(files, fold)
        folds = {t: read[source[p.name]] for t, p in seen_tasks.items() if p.name in source}
        listed = {key: f["train"] | f["val"] for key, f in read.items()}
        used: dict[str, set[str]] = {key: set() for key in read}
        outside = []
        for it, t in cases:
            folder = seen_tasks[t.name].name
            if folder not in source:
                continue
            key, cid = source[folder], case_id(it)
            used[key].add(cid)
            if cid not in listed[key]:
                outside.append(f"{folder}/{cid}")
        if outside:
            raise ValueError(
                f"prepare: {len(outside)} case(s) are in neither the 'train' nor the 'val' list of fold {fold} of "
                f"their split file (e.g. {outside[:5]}); nothing was written."
            )
        for key, ids in listed.items():
            unused = sorted(ids - used[key])
            if unused:
                logger.warning("prepare: %d case(s) of split %s are not in the data (e.g. %s).", len(unused), key,
                               unused[:5])  # fmt: skip
    training: list[dict[str, str]] = []
    validation: list[dict[str, str]] = []
    for task in catalog:
        items = [{"image": it["image"], "label": it["label"], "task": task.name} for it, t in cases if t is task]
        if not items:
            continue
        items.sort(key=lambda it: image_files(it["image"])[0])
        if task.name in folds:
            tr = [it for it in items if case_id(it) in folds[task.name]["train"]]
            va = [it for it in items if case_id(it) in folds[task.name]["val"]]
        else:
            tr, va = _split(items, val_fraction, np.random.default_rng([seed, task.id]))
        training += tr
        validation += va
        logger.info("prepare: task %r: %d training, %d validation case(s).", task.name, len(tr), len(va))
    absent = [t.name for t in catalog if t.name not in seen_tasks]
    if absent:
        logger.info("prepare: catalog task(s) without data: %s.", absent)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_catalog = catalog.select(names=[t.name for t in catalog if t.name in seen_tasks]) if select_present else catalog
    write_json(out / CATALOG_NAME, out_catalog.to_dict())
    datalist_path = out / DATALIST_NAME
    write_json(datalist_path, {"catalog": CATALOG_NAME, "training": training, "validation": validation})
    logger.info("prepare: wrote %s and %s.", datalist_path, out / CATALOG_NAME)
    return datalist_path


def load_datalist(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path | None]:
    """Read a datalist written by :func:`prepare` (or by hand).

    Relative ``image`` / ``label`` paths are resolved against the datalist's folder, as is ``"catalog"``.

    Args:
        path: the ``datalist.json``: ``{"catalog"?: str, "training": [...], "validation"?: [...]}``.

    Returns:
        ``(training_items, validation_items, catalog_path)``; ``catalog_path`` is ``None`` when the datalist
        names no catalog.

    Raises:
        FileNotFoundError, ValueError: naming the file.
    """
    path = Path(path)
    d = read_json(path, "datalist")
    if not isinstance(d, dict) or not isinstance(d.get("training", []), list):
        raise ValueError(f"datalist {str(path)!r} must be a JSON object with a 'training' list.")
    root = path.resolve().parent

    def fix(items: Any, section: str) -> list[dict[str, Any]]:
        if not isinstance(items, list):
            raise ValueError(f"datalist {str(path)!r}: {section!r} must be a list.")
        out = []
        for i, it in enumerate(items):
            if not isinstance(it, dict) or "image" not in it:
                raise ValueError(f"datalist {str(path)!r}: {section}[{i}] must be an object with an 'image' path.")
            it = dict(it)
            for k in ("image", "label"):
                if isinstance(it.get(k), str) and not os.path.isabs(it[k]):
                    it[k] = str(root / it[k])
                elif isinstance(it.get(k), list):  # one file per channel
                    it[k] = [p if not isinstance(p, str) or os.path.isabs(p) else str(root / p) for p in it[k]]
            out.append(it)
        return out

    catalog = d.get("catalog")
    return (
        fix(d.get("training", []), "training"),
        fix(d.get("validation", []), "validation"),
        ((root / catalog) if catalog else None),
    )


# ---------------------------------------------------------------------------------------------- sampler
class TaskBalancedBatchSampler(Sampler[list[int]]):
    """UniSeg's task-balanced batches: one task per batch, every task equally often, shuffled task order.

    Each epoch, every task that has at least one item gets exactly ``batches_per_task`` batches (counted over
    all ranks together). A batch holds ``batch_size`` indices of items of a single task, drawn uniformly with
    replacement from that task's items. The order of the batches is a random permutation of the multiset of
    tasks, which is the same distribution as UniSeg's "next task drawn uniformly among the tasks with quota
    left". Everything is drawn from ``numpy.random.default_rng([seed, epoch])``: the same seed and epoch give the
    same batches on every rank; :meth:`set_epoch` changes the draw.

    Distributed: the global list of ``num_tasks * batches_per_task`` batches is split round-robin, rank ``r``
    taking batches ``r, r + num_replicas, ...``, so ranks get different batches and all the same number
    ``ceil(total / num_replicas)``; when the total is not divisible, the list is padded by wrapping around to
    its start (so a few tasks get one extra batch in that epoch).

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call ``sampler.set_epoch(epoch)`` at the start
    of each epoch. Nothing does this automatically: MONAI workflows only call ``set_epoch`` on a
    ``DistributedSampler`` passed as ``sampler``, so add an ``Events.EPOCH_STARTED`` handler, e.g.
    ``trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))``.
    ``batch_size`` of the DataLoader must stay at its default (the sampler makes the batches).

    Args:
        task_ids: the task id of each dataset item, length ``len(dataset)``.
        batch_size: items per batch, >= 1.
        batches_per_task: batches of each task per epoch (global), default ``50`` (UniSeg: 50, 11 tasks).
        seed: default ``0``.
        num_replicas: number of ranks, default ``None`` = ``torch.distributed`` world size when initialised,
            else 1.
        rank: this rank, default ``None`` = ``torch.distributed`` rank when initialised, else 0.
        mix_tasks: default ``False``; ``True`` lets a batch hold items of different tasks of one *group* (Hermes'
            mixed-task batches): the epoch keeps ``num_tasks * batches_per_task`` batches; each batch's group is
            drawn with probability proportional to its number of tasks, each element's task uniformly within the
            group, then an item of that task uniformly.
        groups: with ``mix_tasks``, task id -> group key (tasks whose images can be stacked: same channel count
            and patch size; :meth:`from_items` derives it from the catalog), default ``None`` = one group.
        weights: task id -> weight of each of its items (Hermes' dataset weights), default ``None`` = task-balanced.
            With weights, items are drawn in proportion to their task's weight, so a task's expected share of the
            samples is ``weight * items / sum(weight * items)``: with ``mix_tasks`` each batch's group is drawn by
            its share and each element's task by its share within the group; without, each batch's task is drawn
            by its share (instead of the equal quotas).
        oversample_foreground: nnU-Net's foreground oversampling rate, default ``None`` (off: the sampler yields
            plain indices). With a rate ``p``, batch positions ``j >= round(batch_size * (1 - p))`` are forced to
            hold foreground (nnU-Net v1 / UniSeg: ``p = 0.33``, the last of 2, 1 of 3, 2 of 6), and the sampler
            yields ``(index, force)`` pairs, which :class:`PatchDataset` hands to
            :class:`~uniseg_components.transforms.TaskRandCropd`.

    Raises:
        ValueError: for an empty ``task_ids``, negative task ids, ``batch_size`` or ``batches_per_task`` < 1,
            ``num_replicas`` < 1, ``rank`` outside ``[0, num_replicas)``, a task without a group or a weight, a
            weight that is not positive, or ``oversample_foreground`` outside ``[0, 1]``.
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        batch_size: int,
        batches_per_task: int = 50,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        mix_tasks: bool = False,
        groups: Mapping[int, Any] | None = None,
        weights: Mapping[int, float] | None = None,
        oversample_foreground: float | None = None,
    ) -> None:
        ids = [int(t) for t in (task_ids.tolist() if hasattr(task_ids, "tolist") else task_ids)]
        if not ids:
            raise ValueError("task_ids is empty: the dataset has no items to sample from.")
        if min(ids) < 0:
            raise ValueError(f"task ids must be >= 0, got {min(ids)}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if int(batches_per_task) < 1:
            raise ValueError(f"batches_per_task must be >= 1, got {batches_per_task}.")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if int(num_replicas) < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}.")
        self.batch_size = int(batch_size)
        self.batches_per_task = int(batches_per_task)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        arr = np.asarray(ids)
        #: task id -> indices of its items (only tasks that have items)
        self.indices: dict[int, np.ndarray] = {int(t): np.flatnonzero(arr == t) for t in np.unique(arr)}
        self.mix_tasks = bool(mix_tasks)
        missing = [t for t in self.indices if groups is not None and t not in groups]
        if missing:
            raise ValueError(f"groups has no entry for task id(s) {missing}.")
        if oversample_foreground is not None and not 0.0 <= float(oversample_foreground) <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1] or None, got {oversample_foreground}.")
        self.oversample_foreground = None if oversample_foreground is None else float(oversample_foreground)
        self.weights: dict[int, float] | None = None
        if weights is not None:
            missing = [t for t in self.indices if t not in weights]
            if missing:
                raise ValueError(f"weights has no entry for task id(s) {missing}.")
            bad = {t: weights[t] for t in self.indices if not float(weights[t]) > 0}
            if bad:
                raise ValueError(f"weights must be positive, got {bad}.")
            self.weights = {t: float(weights[t]) for t in self.indices}
        keys = {t: (0 if groups is None else groups[t]) for t in self.tasks}
        #: the groups of tasks that may share a batch (with ``mix_tasks``), in order of their first task
        self.groups: list[list[int]] = []
        for t in self.tasks:
            same = next((g for g in self.groups if keys[g[0]] == keys[t]), None)
            if same is None:
                self.groups.append([t])
            else:
                same.append(t)

    @classmethod
    def from_items(
        cls,
        items: Sequence[Mapping[str, Any]],
        catalog: TaskCatalog | str | os.PathLike,
        batch_size: int,
        task_key: str = "task",
        mix_tasks: bool = False,
        default_task: str | int | None = None,
        weighted: bool = False,
        **kwargs: Any,
    ) -> TaskBalancedBatchSampler:
        """Build the sampler from datalist items ``{"task": name or id, ...}`` (the dataset's ``data``).

        Args:
            items: the dataset's items, in dataset order.
            catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
            batch_size: items per batch.
            task_key: key of the task in the items, default ``"task"``.
            mix_tasks: batches may mix tasks with the same channel count and patch size, default ``False``.
            default_task: task of items without ``task_key`` (the same default the transforms' ``AttachTaskd`` is
                given), default ``None`` (every item needs one).
            weighted: draw items by their task's ``sample_weight`` (the catalog field; Hermes' dataset-weighted
                sampling), default ``False`` (task-balanced).
            kwargs: ``batches_per_task``, ``seed``, ``num_replicas``, ``rank``, ``oversample_foreground``.

        Raises:
            ValueError: an item without a task and no ``default_task``; unknown tasks (``UnknownTaskError``).
        """
        catalog = TaskCatalog.resolve(catalog)
        if default_task is None and any(task_key not in it for it in items):
            raise ValueError(
                f"training items without a {task_key!r} key; set the bundle's 'task' (--task NAME) as their default."
            )
        groups = {t.id: (t.num_channels, tuple(t.patch_size)) for t in catalog}
        ids = [catalog[it.get(task_key, default_task)].id for it in items]
        weights = {t.id: t.sample_weight for t in catalog} if weighted else None
        return cls(ids, batch_size, mix_tasks=mix_tasks, groups=groups, weights=weights, **kwargs)

    @property
    def tasks(self) -> list[int]:
        """Ids of the tasks that have items, sorted."""
        return sorted(self.indices)

    @property
    def total_batches(self) -> int:
        """Batches per epoch over all ranks, before padding."""
        return len(self.indices) * self.batches_per_task

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: the batches of each epoch are drawn from ``(seed, epoch)``."""
        self.epoch = int(epoch)

    def shares(self) -> dict[int, float]:
        """Each task's expected share of the samples: equal without weights, else weight times items,
        normalised."""
        if self.weights is None:
            return {t: 1.0 / len(self.indices) for t in self.tasks}
        mass = {t: self.weights[t] * len(self.indices[t]) for t in self.tasks}
        total = sum(mass.values())
        return {t: m / total for t, m in mass.items()}

    def foreground_flags(self) -> list[bool]:
        """Which positions of a batch are forced to hold foreground (all ``False`` without
        ``oversample_foreground``)."""
        if self.oversample_foreground is None:
            return [False] * self.batch_size
        first = round(self.batch_size * (1.0 - self.oversample_foreground))
        return [j >= first for j in range(self.batch_size)]

    def _weighted_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """The batches of an epoch drawn by the tasks' shares (see ``weights``)."""
        share = self.shares()
        if self.mix_tasks:
            mass = np.asarray([sum(share[t] for t in g) for g in self.groups])
            picks = rng.choice(len(self.groups), size=self.total_batches, p=mass / mass.sum())
            tasks = np.zeros((self.total_batches, self.batch_size), dtype=int)
            for i, g in enumerate(self.groups):
                rows = np.flatnonzero(picks == i)
                p = np.asarray([share[t] for t in g]) / mass[i]
                tasks[rows] = rng.choice(np.asarray(g), size=(len(rows), self.batch_size), p=p)
        else:
            p = np.asarray([share[t] for t in self.tasks])
            order = rng.choice(np.asarray(self.tasks), size=self.total_batches, p=p / p.sum())
            tasks = np.repeat(order[:, None], self.batch_size, axis=1)
        return self._items_of(tasks, rng)

    def _items_of(self, tasks: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Batches of dataset indices for a ``(batches, batch_size)`` array of task ids: each element an item of its
        task, drawn uniformly with replacement."""
        items = np.empty_like(tasks)
        for t, idx in self.indices.items():
            where = tasks == t
            items[where] = idx[rng.integers(0, len(idx), size=int(where.sum()))]
        return items.tolist()

    def global_batches(self) -> list[list[int]]:
        """All batches of the current epoch, in order, for all ranks (padded to a multiple of the ranks), as
        dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            batches = self._weighted_batches(rng)
        elif self.mix_tasks:
            sizes = np.asarray([len(g) for g in self.groups])
            picks = rng.choice(len(self.groups), size=self.total_batches, p=sizes / sizes.sum())
            # each element's task uniformly within its batch's group, then an item of that task uniformly
            slot = np.floor(rng.random((self.total_batches, self.batch_size)) * sizes[picks][:, None]).astype(int)
            table = np.zeros((len(self.groups), int(sizes.max())), dtype=int)
            for i, g in enumerate(self.groups):
                table[i, : len(g)] = g
            batches = self._items_of(table[picks[:, None], slot], rng)
        else:
            order = np.repeat(np.asarray(self.tasks), self.batches_per_task)
            order = order[rng.permutation(len(order))]
            batches = [rng.choice(self.indices[int(t)], size=self.batch_size, replace=True).tolist() for t in order]
        pad = -len(batches) % self.num_replicas
        return batches + [batches[i % len(batches)] for i in range(pad)]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, bool]]]:
        mine = self.global_batches()[self.rank :: self.num_replicas]
        if self.oversample_foreground is None:
            yield from mine
        else:
            flags = self.foreground_flags()
            for batch in mine:
                yield list(zip(batch, flags))

    def __len__(self) -> int:
        return -(-self.total_batches // self.num_replicas)


# ---------------------------------------------------------------------------------------------- datasets
#: bump when the code of the deterministic transforms changes what they write (invalidates every disk cache)
CACHE_FORMAT = 1


def default_num_workers(max_workers: int = 16) -> int:
    """DataLoader workers for this machine: the CPUs this process may use, less 2 (the main process and the
    device's feeder), between 0 and ``max_workers`` (default 16): 0 on a 2-core machine, 14 on 16 cores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(int(max_workers), cpus - 2))


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-ready description of a transform's configuration: simple values as they are, catalogs as their dict,
    objects as their class name and (two levels deep) their public attributes; never a memory address."""
    if isinstance(obj, TaskCatalog):
        return obj.to_dict()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(_describe(v, depth) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if inspect.isroutine(obj) or isinstance(obj, type):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    if isinstance(obj, (torch.dtype, torch.device, np.dtype)):
        return str(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth >= 2 or not hasattr(obj, "__dict__"):
        return name
    attrs = {k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
    return {"class": name, **attrs}


def transform_hash(transforms: Sequence[Any]) -> bytes:
    """The cache key part of a transform chain (``PersistentDataset(hash_transform=...)``): a digest of the package
    version, :data:`CACHE_FORMAT` and every transform's class and parameters, the task catalog included, so that a
    change of catalog (spacing, normalisation...) or of the transforms makes a new cache."""
    from . import __version__

    text = json.dumps([__version__, CACHE_FORMAT, [_describe(t) for t in transforms]], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16].encode()


def item_hash(item: Mapping[str, Any]) -> bytes:
    """The cache key part of a data item: a digest of the item and, for every file it names, its size and
    modification time, so that a replaced image or label is preprocessed again."""
    stats = []
    for value in item.values():
        for p in (
            [value] if isinstance(value, (str, os.PathLike)) else value if isinstance(value, (list, tuple)) else []
        ):
            if isinstance(p, (str, os.PathLike)) and os.path.isfile(p):
                st = os.stat(p)
                stats.append([os.fspath(p), st.st_size, st.st_mtime_ns])
    text = json.dumps([_describe(dict(item)), stats], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest().encode()


class DiskCacheDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` for collections larger than RAM: the deterministic pre-processing of every item
    runs once and is stored in ``cache_dir`` (one ``.pt`` file per item, written atomically); training reads it
    from there, so memory stays bounded by the items in flight, whatever the number of cases.

    The cache file's name is :func:`item_hash` (the item and its files' size and modification time) followed by
    :func:`transform_hash` (the catalog and the deterministic transforms' parameters): a changed file, catalog or
    transform is preprocessed again into a new file, and stale files are never read. :meth:`precompute` fills the
    cache in parallel with a progress bar (the bundles do it before training starts).

    Args:
        data: the items ``{"image", "label", "task"}``.
        transform: the pipeline (a ``Compose``); its part before the first random transform is cached.
        cache_dir: the cache folder (created).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Any, cache_dir: str | os.PathLike) -> None:
        super().__init__(
            data,
            transform,
            cache_dir=Path(cache_dir),
            hash_func=item_hash,
            hash_transform=transform_hash,
            track_meta=True,
            weights_only=False,  # our own files: MetaTensors with their metadata
        )

    def cache_file(self, index: int) -> Path:
        """Where item ``index`` is (or will be) cached."""
        return Path(self.cache_dir) / f"{self.hash_func(self.data[index]).decode()}{self.transform_hash}.pt"

    def precompute(self, num_workers: int = 0, progress: bool = True) -> int:
        """Preprocess the items that are not cached yet, ``num_workers`` processes in parallel (0: in this
        process), with a progress bar; on several ranks each rank takes its share. Errors name the item's file.

        Returns:
            the number of items preprocessed by this rank.
        """
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from .distributed import get_rank, get_world_size

        missing = [i for i in range(len(self.data)) if not self.cache_file(i).is_file()]
        mine = missing[get_rank() :: get_world_size()]
        if mine:
            loader = DataLoader(_Precompute(self, mine), batch_size=None, num_workers=num_workers)
            logger.info("preprocessing %d of %d case(s) into %s", len(mine), len(self.data), self.cache_dir)
            for _ in tqdm(loader, total=len(mine), desc="preprocess", disable=not progress):
                pass
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's share is written before any rank reads
        return len(mine)


class _Precompute:
    """Map-style dataset over the uncached items of a :class:`DiskCacheDataset`: computing an item caches it; only
    its index travels back from the worker."""

    def __init__(self, dataset: DiskCacheDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> int:
        self.dataset._cachecheck(self.dataset.data[self.indices[k]])
        return self.indices[k]


class PatchDataset(torch.utils.data.Dataset):
    """The training dataset of the bundles: ``dataset`` holds the deterministic preprocessing (cached), and
    ``transform``, the random part (patch crop and augmentation), runs on every access.

    An index is an int, or the ``(index, force)`` pair a :class:`TaskBalancedBatchSampler` with
    ``oversample_foreground`` yields; ``force`` reaches :class:`~uniseg_components.transforms.TaskRandCropd` as the
    item key ``force_key``, so the batch position decides whether the patch is forced to hold foreground. The
    cached item is not copied: the crop makes new tensors before anything else changes them.

    Args:
        dataset: the cached dataset of the deterministic transforms (``CacheDataset`` or :class:`DiskCacheDataset`).
        transform: the random transforms (a ``Compose``).
        force_key: default ``"force_fg"``.
    """

    def __init__(self, dataset: Dataset, transform: Callable, force_key: str = FORCE_FG_KEY) -> None:
        self.dataset, self.transform, self.force_key = dataset, transform, force_key

    @property
    def data(self) -> Sequence[Mapping[str, Any]]:
        """The items of the underlying dataset."""
        return self.dataset.data

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, bool]) -> Any:
        index, force = key if isinstance(key, (tuple, list)) else (key, None)
        item = dict(self.dataset[int(index)])
        if force is not None:
            item[self.force_key] = bool(force)
        return apply_transform(self.transform, item)


def cached_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """The train and validation datasets of the bundles: in RAM (MONAI's ``CacheDataset``, the default, right for
    small collections such as the demo) or, with ``cache_dir``, on disk (:class:`DiskCacheDataset`, filled here
    with :meth:`~DiskCacheDataset.precompute`, for collections of any size).

    The transforms up to the first random one (MONAI's rule) are cached; when there are random ones (training),
    the result is a :class:`PatchDataset` that runs them per access and takes the sampler's ``(index, force)``
    pairs.

    Args:
        data: the items.
        transform: the pipeline.
        cache_dir: a folder for the disk cache, default ``None`` (RAM).
        cache_rate: share of the items cached in RAM without ``cache_dir``, default ``1.0``.
        num_workers: processes preprocessing the disk cache (threads filling the RAM cache), default 0.
        progress: show a progress bar while the disk cache is filled, default ``True``.
    """
    random: Any = None
    if isinstance(transform, Compose):
        first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        if first is not None:
            transform, random = Compose(transform.transforms[:first]), Compose(transform.transforms[first:])
    ds: Dataset
    if cache_dir is None or str(cache_dir) == "":
        ds = CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers or 1)
    else:
        ds = DiskCacheDataset(data, transform, cache_dir)
        ds.precompute(num_workers=num_workers, progress=progress)
    return ds if random is None else PatchDataset(ds, random)

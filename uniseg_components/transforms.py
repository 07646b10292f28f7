# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Task-aware dictionary transforms and the UniSeg pre-processing / augmentation pipelines.

Every item of a datalist is a dict ``{"image": path, "label": path, "task": name}`` (no ``"label"`` at
inference). The transforms here look the task up in a :class:`~uniseg_components.tasks.TaskCatalog` and apply
what the task asks for: its modality normalisation, its target spacing, its patch size. The array layout is
MONAI's: channel first, spatial axes ``(x, y, z)`` (or ``(x, y)`` for 2D tasks) after ``Orientationd("RAS")``.

Pipeline built by :func:`deterministic_transforms` (cacheable: nothing random in it)::

    AttachTaskd -> LoadImaged -> EnsureChannelFirstd -> Squeeze2Dd -> CheckTaskInputd -> TaskOrientationd(RAS)
    -> TaskSpacingd -> CropForegroundd (non-zero region of the raw intensities) -> NormalizeModalityd
    -> EnsureTyped

and by :func:`random_transforms` (training only)::

    TaskRandCropd (SpatialPadd + RandCropByLabelClassesd, 1/3 foreground) -> nnU-Net "moreDA" augmentation

Design choices (see the function docstrings for details):

* **Reader.** ``LoadImaged(reader=None)`` lets MONAI choose by file suffix, which for NIfTI is
  ``NibabelReader``. Both ``NibabelReader`` and ``ITKReader`` were checked on 3D, 4D channel-last MSD files
  ``(X, Y, Z, C)`` and 2D files ``(X, Y)``: both give ``(C, X, Y, Z)`` / ``(1, X, Y)`` after
  ``EnsureChannelFirstd`` and the same affines, and both invert correctly. Nibabel is the default because it is
  as fast once warm, does not pay ITK's few-seconds import in every process / DataLoader worker, and keeps
  NIfTI's own sform/qform interpretation; other formats (``.nrrd``, ``.mha``, DICOM, PNG) still go to ITK / PIL.
  Pass ``reader="ITKReader"`` to force ITK.
* **Foreground crop.** nnU-Net (and UniSeg) crop to the non-zero region of the *raw* image (any channel),
  before normalisation. After z-scoring, the background is negative and ``> 0`` would cut into the object, so
  the crop runs before :class:`NormalizeModalityd` with ``select_fn=nonzero``. For CT the raw background is
  air (about -1000 HU, non-zero), so CT volumes are usually not cropped, exactly as in nnU-Net. The crop is
  invertible (``Invertd`` pads the prediction back).
* **2D tasks** accept true 2D NIfTI ``(X, Y)`` and nnU-Net's ``(X, Y, 1)`` / ``(X, Y, 1, C)`` convention: a
  trailing singleton spatial axis is squeezed by :class:`Squeeze2Dd` (not inverted: predictions of such files
  come back as 2D ``(X, Y)`` maps).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
    SaveImaged,
    Spacingd,
    SpatialPadd,
    SqueezeDim,
)
from monai.transforms.inverse import InvertibleTransform
from monai.utils import MAX_SEED, TraceKeys

from .dicom import is_series_reference, with_series_reader, write_dicom_seg
from .io import output_path, save_label_map
from .tasks import TaskCatalog, TaskSpec, UnknownTaskError, normalization_of

__all__ = [
    "CT_WINDOW",
    "nonzero",
    "AttachTaskd",
    "TaskMapTransform",
    "Squeeze2Dd",
    "CheckTaskInputd",
    "TaskOrientationd",
    "TaskSpacingd",
    "NormalizeModalityd",
    "PerTaskd",
    "TaskRandCropd",
    "augmentation_transforms",
    "deterministic_transforms",
    "random_transforms",
    "train_transforms",
    "val_transforms",
    "inference_transforms",
    "SaveLabelMapd",
    "SaveDicomSegd",
]

logger = logging.getLogger(__name__)

#: UniSeg's CT window in HU: clipped to this range, then scaled linearly to [0, 1].
CT_WINDOW: tuple[float, float] = (-325.0, 325.0)

# nibabel's axis labels, i.e. the affine maps to RAS+ world coordinates (what both readers return)
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def nonzero(x: Any) -> Any:
    """``x != 0``: the foreground selector of :class:`~monai.transforms.CropForegroundd` (nnU-Net's non-zero
    crop). A module-level function, so that pipelines pickle into spawned DataLoader workers."""
    return x != 0


def _filename(value: Any, default: str = "<unknown file>") -> str:
    """The source file of an item value: a path string, or ``meta["filename_or_obj"]`` of a MetaTensor."""
    if isinstance(value, MetaTensor):
        name = value.meta.get("filename_or_obj")
        return str(name) if name else default
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return default


def _task_of(catalog: TaskCatalog, d: Mapping[Hashable, Any], task_key: str, image_key: str = "image") -> TaskSpec:
    """Look the item's task up; unknown or missing tasks raise :class:`UnknownTaskError` naming the file."""
    where = _filename(d.get(image_key)) if image_key in d else "item"
    if task_key not in d:
        raise UnknownTaskError(
            f"{where}: the item has no {task_key!r} key; every datalist item needs the task name or id "
            f"(known tasks: {', '.join(catalog.names)})."
        )
    try:
        return catalog[d[task_key]]
    except UnknownTaskError as e:
        raise UnknownTaskError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------- task and checks
class AttachTaskd(MapTransform):
    """Resolve the item's task and attach its name and integer id.

    ``d[task_key]`` may be a task name, an integer id or an id written as a string; afterwards
    ``d[task_key]`` is the task name (str) and ``d[id_key]`` the task id (int), which the DataLoader collates
    into a ``(B,)`` tensor.

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task in the item, default ``"task"``.
        id_key: key written with the integer id, default ``"task_id"``.
        image_key: key of the image, only used to name the file in error messages, default ``"image"``.
        default: task used when the item has no ``task_key`` (e.g. an inference datalist of a single task),
            default ``None`` (the key is required).

    Raises:
        UnknownTaskError: (a ``KeyError`` and ``ValueError``) naming the image file, the task and the known tasks.
    """

    def __init__(
        self,
        catalog: TaskCatalog | str | os.PathLike,
        task_key: str = "task",
        id_key: str = "task_id",
        image_key: str = "image",
        default: str | int | None = None,
    ) -> None:
        super().__init__(keys=task_key)
        self.catalog = TaskCatalog.resolve(catalog)
        self.task_key, self.id_key, self.image_key = task_key, id_key, image_key
        self.default = None if default is None else self.catalog[default].name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.task_key not in d and self.default is not None:
            d[self.task_key] = self.default
        task = _task_of(self.catalog, d, self.task_key, self.image_key)
        d[self.task_key] = task.name
        d[self.id_key] = task.id
        return d


class TaskMapTransform(MapTransform):
    """Base of the dictionary transforms that act by the item's task: holds the catalog and the task key, and
    :meth:`task_of` looks the item's task up (an unknown or missing task raises ``UnknownTaskError`` naming the file).

    Args:
        keys: keys to transform.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
        allow_missing_keys: don't raise when a key is missing, default ``False``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        catalog: TaskCatalog | str | os.PathLike,
        task_key: str = "task",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.catalog = TaskCatalog.resolve(catalog)
        self.task_key = task_key

    def task_of(self, d: Mapping[Hashable, Any]) -> TaskSpec:
        """The task of item ``d``."""
        return _task_of(self.catalog, d, self.task_key, self.first_key(d) or "image")


class Squeeze2Dd(TaskMapTransform):
    """For 2D tasks, drop a trailing singleton spatial axis: ``(C, X, Y, 1) -> (C, X, Y)``.

    nnU-Net and many MSD-style 2D collections store 2D images as ``(X, Y, 1)`` (or ``(X, Y, 1, C)``) NIfTI.
    Items of 3D tasks, and 2D items that are already 2D, pass unchanged. The affine is reduced accordingly
    (``SqueezeDim(update_meta=True)``). Not invertible: a prediction of such a file comes back as ``(X, Y)``.
    Run after ``EnsureChannelFirstd`` and before :class:`CheckTaskInputd`.

    Args:
        keys: keys to squeeze (image and label).
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
        allow_missing_keys: don't raise when a key is missing, default ``False``.
    """

    squeeze = SqueezeDim(dim=-1, update_meta=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        task = self.task_of(d)
        if task.dims != 2:
            return d
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim == 4 and x.shape[-1] == 1:
                d[key] = self.squeeze(x)
        return d


class CheckTaskInputd(MapTransform):
    """Check a loaded, channel-first item against its task; raise a ``ValueError`` that names the file.

    Checks: the image has one channel per task modality and ``task.dims`` spatial axes (a 2D image for a 3D
    task, or the reverse, is an error), no NaN/Inf in the image; the label (when present) has one channel, the
    image's spatial shape, integer values and values in ``[0, task.num_classes)``.
    Run after ``LoadImaged`` + ``EnsureChannelFirstd`` (+ :class:`Squeeze2Dd`), before any resampling. Inside a
    ``Compose`` MONAI re-raises the error as ``RuntimeError("applying transform ...")`` from this ``ValueError``
    (see ``__cause__``; both messages are printed in the traceback).

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        image_key: key of the image, shape ``(C, *spatial)``, default ``"image"``.
        label_key: key of the label, shape ``(1, *spatial)``, default ``"label"``; skipped when absent
            (inference) or ``None``.
        task_key: key of the task, default ``"task"``.
    """

    def __init__(
        self,
        catalog: TaskCatalog | str | os.PathLike,
        image_key: str = "image",
        label_key: str | None = "label",
        task_key: str = "task",
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.catalog = TaskCatalog.resolve(catalog)
        self.image_key, self.label_key, self.task_key = image_key, label_key, task_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        task = _task_of(self.catalog, d, self.task_key, self.image_key)
        if self.image_key not in d:
            raise KeyError(f"item of task {task.name!r} has no {self.image_key!r} key.")
        image = d[self.image_key]
        fname = _filename(image)
        where = f"{fname} (task {task.name!r})"
        c, spatial = int(image.shape[0]), tuple(int(s) for s in image.shape[1:])
        if len(spatial) != task.dims:
            hint = ""
            if task.dims == 2 and c == 1 and len(spatial) == 3 and spatial[-1] == task.num_channels > 1:
                hint = f" A 2D {task.num_channels}-channel image must be stored as (X, Y, 1, C), not (X, Y, C)."
            raise ValueError(
                f"{where}: expected a {task.dims}D image with {task.num_channels} channel(s), got a "
                f"{len(spatial)}D image of channel-first shape {(c, *spatial)}.{hint}"
            )
        if c != task.num_channels:
            raise ValueError(
                f"{where}: expected {task.num_channels} input channel(s) ({', '.join(task.modalities)}), "
                f"got {c} (channel-first image shape {(c, *spatial)})."
            )
        img = torch.as_tensor(image)
        if img.is_floating_point() and not bool(torch.isfinite(img).all()):
            n_bad = int((~torch.isfinite(img)).sum())
            raise ValueError(f"{where}: the image contains {n_bad} NaN/Inf voxel(s); expected finite values.")
        if self.label_key and self.label_key in d:
            label = d[self.label_key]
            lname = _filename(label, default=fname)
            lwhere = f"{lname} (task {task.name!r})"
            lshape = tuple(int(s) for s in label.shape)
            if lshape != (1, *spatial):
                raise ValueError(
                    f"{lwhere}: expected a one-channel label of channel-first shape {(1, *spatial)} matching "
                    f"the image {fname}, got {lshape}."
                )
            lab = torch.as_tensor(label)
            bad = ~torch.isfinite(lab) | (lab != torch.round(lab)) if lab.is_floating_point() else None
            if bad is not None and bool(bad.any()):
                vals = torch.unique(lab[bad])[:10].tolist()
                raise ValueError(f"{lwhere}: label values must be integers, got non-integer values e.g. {vals}.")
            lo, hi = float(lab.min()), float(lab.max())
            if lo < 0 or hi >= task.num_classes:
                vals = [int(v) for v in torch.unique(lab).tolist()]
                raise ValueError(
                    f"{lwhere}: label values must be in [0, {task.num_classes}) for classes "
                    f"{list(task.labels)}, got values {vals[:20]}."
                )
        return d


# ---------------------------------------------------------------------------------------------- geometry
class _PerTaskInvertibled(TaskMapTransform, InvertibleTransform):
    """Base of invertible transforms that hold one MONAI dictionary transform per task and delegate to it.

    ``__call__`` applies ``self.per_task[task_name]``. ``inverse`` (and so ``Invertd``, which gives it only the
    key being inverted, without the task) picks the per-task instance whose array transform produced the most
    recent trace of each key. When the trace comes from another process (spawned DataLoader workers, a
    ``PersistentDataset`` cache), no instance has its id: the trace's class is then checked against
    ``trace_class`` and inverted by any instance, since the inverse only uses the recorded geometry.
    Subclasses fill ``self.per_task`` and define ``trace_class`` and ``_traced``.
    """

    trace_class: str = ""
    per_task: dict[str, MapTransform]

    @staticmethod
    def _traced(t: Any) -> Any:
        """The array transform of ``t`` whose ``id`` the trace records."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        task = self.task_of(d)
        list(self.key_iterator(d))  # raises for a missing key unless allow_missing_keys
        return self.per_task[task.name](d)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = type(self).__name__
        for key in self.key_iterator(d):
            x = d[key]
            ops = x.applied_operations if isinstance(x, MetaTensor) else []
            if not ops:
                raise RuntimeError(f"{name}.inverse: {key!r} is not a MetaTensor with applied operations to invert.")
            op = ops[-1]
            by_id = {id(self._traced(t)): t for t in self.per_task.values()}
            t = by_id.get(op.get(TraceKeys.ID))
            if t is None:  # trace from another process: check the kind, then skip the id check
                if op.get(TraceKeys.CLASS_NAME) != self.trace_class:
                    raise RuntimeError(
                        f"{name}.inverse: the most recent transform of {key!r} is {op.get(TraceKeys.CLASS_NAME)!r}, "
                        f"expected {self.trace_class!r}; is Invertd given the pipeline that produced the data?"
                    )
                op[TraceKeys.ID] = TraceKeys.NONE
                t = next(iter(self.per_task.values()))
            d[key] = self._traced(t).inverse(x)
        return d


class TaskOrientationd(_PerTaskInvertibled):
    """``Orientationd`` with the axis codes cut to the task's rank: ``"RAS"`` for 3D tasks, ``"RA"`` for 2D.

    (A single ``Orientationd("RAS")`` also handles 2D images but warns on every 2D item.) Invertible.

    Args:
        keys: keys to reorient, e.g. ``("image", "label")``.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
        axcodes: 3D axis codes, default ``"RAS"``; 2D tasks use the first two.
        allow_missing_keys: don't raise when a key is missing, default ``False``.
    """

    trace_class = "Orientation"

    def __init__(
        self,
        keys: KeysCollection,
        catalog: TaskCatalog | str | os.PathLike,
        task_key: str = "task",
        axcodes: str = "RAS",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, catalog, task_key, allow_missing_keys)
        if len(axcodes) != 3:
            raise ValueError(f"axcodes must name the three axes, e.g. 'RAS', got {axcodes!r}.")
        by_dims = {
            dims: Orientationd(self.keys, axcodes=axcodes[:dims], labels=_AXIS_LABELS, allow_missing_keys=True)
            for dims in self.catalog.dims
        }
        self.per_task = {t.name: by_dims[t.dims] for t in self.catalog}

    @staticmethod
    def _traced(t: Orientationd) -> Any:
        return t.ornt_transform

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        # MONAI's Orientation.inverse derives 3 axis codes from the 4x4 affine that NibabelReader gives 2D files
        # and then warns that they do not match the 2 spatial axes; the inverse itself is right.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"axcodes .* length is smaller than number of input spatial")
            return super().inverse(data)


class TaskSpacingd(_PerTaskInvertibled):
    """Resample each item to its task's target spacing (``task.spacing``); invertible.

    Holds one :class:`monai.transforms.Spacingd` per task and delegates to the item's task; ``inverse`` (and so
    ``Invertd``) finds the instance that resampled the item (see ``_PerTaskInvertibled``), also when the data
    was made in DataLoader worker processes.

    Args:
        keys: keys to resample, e.g. ``("image", "label")``.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
        mode: interpolation per key, default ``("bilinear", "nearest")``; a sequence longer than ``keys`` is cut
            to ``len(keys)`` (so the default also serves ``keys=("image",)``).
        padding_mode: ``Spacingd`` padding per key, default ``"border"``.
        align_corners: default ``False``.
        dtype: computation dtype, default ``np.float64``.
        allow_missing_keys: don't raise when a key is missing, default ``False``.
        kwargs: further ``Spacingd`` arguments (``scale_extent``, ``recompute_affine``, ...).
    """

    trace_class = "SpatialResample"

    def __init__(
        self,
        keys: KeysCollection,
        catalog: TaskCatalog | str | os.PathLike,
        task_key: str = "task",
        mode: str | Sequence[str] = ("bilinear", "nearest"),
        padding_mode: str | Sequence[str] = "border",
        align_corners: bool | Sequence[bool] = False,
        dtype: Any = np.float64,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, catalog, task_key, allow_missing_keys)
        if not isinstance(mode, str) and len(mode) > len(self.keys):
            mode = tuple(mode)[: len(self.keys)]
        self.per_task = {
            t.name: Spacingd(
                self.keys,
                pixdim=t.spacing,
                mode=mode,
                padding_mode=padding_mode,
                align_corners=align_corners,
                dtype=dtype,
                allow_missing_keys=True,
                **kwargs,
            )
            for t in self.catalog
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        # MONAI's Spacingd updates every entry named "<key>_*" with the resampled image's metadata (meant for
        # "<key>_meta_dict"), and fails on other values such as the "image_path" string MONAI Label sends: hand it
        # only the entries it may update
        d = dict(data)
        aside = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str)
            and not isinstance(d[k], Mapping)
            and any(k.startswith(f"{key}_") for key in self.keys if isinstance(key, str))
        }
        out = super().__call__(d)
        out.update(aside)
        return out

    @staticmethod
    def _traced(t: Spacingd) -> Any:
        return t.spacing_transform.sp_resample


# ---------------------------------------------------------------------------------------------- intensity
class NormalizeModalityd(TaskMapTransform):
    """Normalise each channel by the task's modality of that channel (UniSeg's scheme).

    * CT channels (``normalization_of(m) == "ct"``): clip to the task's ``ct_window`` (else this transform's
      ``ct_window``, default [-325, 325] HU), then scale linearly to [0, 1]; when the task has ``ct_zscore``
      ``(mean, std)`` (nnU-Net's foreground statistics, written by ``uniseg plan``), z-score with it instead.
    * All other modalities (MR, PET, US, ...): per-volume, per-channel z-score ``(x - mean) / max(std, eps)``
      over the whole channel (UniSeg ran nnU-Net with the non-zero mask off), or, for a task with
      ``nonzero_mask``, with the mean and std of the non-zero region (any channel non-zero) and 0 outside it
      (nnU-Net's ``use_mask_for_norm``). ``std`` is the population std.

    The output is float32 with the input's shape ``(C, *spatial)`` and metadata.

    Args:
        keys: image key(s), default ``"image"``.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
        ct_window: CT clipping window in HU, default ``(-325.0, 325.0)``.
        eps: lower bound of the z-score std, default ``1e-8``.
        allow_missing_keys: don't raise when a key is missing, default ``False``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        catalog: TaskCatalog | str | os.PathLike | None = None,
        task_key: str = "task",
        ct_window: tuple[float, float] = CT_WINDOW,
        eps: float = 1e-8,
        allow_missing_keys: bool = False,
    ) -> None:
        if catalog is None:
            raise ValueError("NormalizeModalityd needs a catalog (TaskCatalog, catalog JSON path or built-in name).")
        if not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {ct_window}.")
        super().__init__(keys, catalog, task_key, allow_missing_keys)
        self.ct_window, self.eps = (float(ct_window[0]), float(ct_window[1])), float(eps)

    def normalize(self, img: torch.Tensor, task: TaskSpec) -> torch.Tensor:
        """Normalise ``img`` of shape ``(C, *spatial)`` with ``C == task.num_channels``."""
        if img.shape[0] != task.num_channels:
            raise ValueError(
                f"task {task.name!r}: expected {task.num_channels} channel(s) ({', '.join(task.modalities)}), "
                f"got an image of channel-first shape {tuple(img.shape)}."
            )
        img = img.float() if img.dtype != torch.float32 else img.clone()
        lo, hi = task.ct_window or self.ct_window
        mask = (img != 0).any(dim=0) if task.nonzero_mask else None
        for c, modality in enumerate(task.modalities):
            ch = img[c]
            if normalization_of(modality) == "ct" and task.ct_zscore is not None:
                img[c] = (ch.clamp(lo, hi) - task.ct_zscore[0]) / task.ct_zscore[1]
            elif normalization_of(modality) == "ct":
                img[c] = (ch.clamp(lo, hi) - lo) / (hi - lo)
            elif mask is not None and bool(mask.any()):
                inside = ch[mask]
                std = inside.std(unbiased=False).clamp_min(self.eps)
                img[c] = torch.where(mask, (ch - inside.mean()) / std, torch.zeros_like(ch))
            else:
                std = ch.std(unbiased=False).clamp_min(self.eps)
                img[c] = (ch - ch.mean()) / std
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        task = self.task_of(d)
        for key in self.key_iterator(d):
            x = d[key]
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x))
            d[key] = self.normalize(x, task)
        return d


# ---------------------------------------------------------------------------------------------- random, per task
class PerTaskd(Randomizable, MapTransform):
    """Apply the transform of the item's task: ``transforms[task_name](d)``.

    The building block of per-task random transforms (patch size and 2D/3D-specific augmentation differ per
    task). ``set_random_state`` seeds every inner transform from this transform's generator (in task-name
    order), like ``Compose`` does, so ``Compose([...]).set_random_state(seed)`` makes the pipeline
    deterministic. Several tasks may share one transform object.

    Args:
        transforms: task name -> transform (a callable on the item dict, usually a ``Compose``); every task of
            the catalog needs one.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        task_key: key of the task, default ``"task"``.
    """

    def __init__(
        self,
        transforms: Mapping[str, Callable],
        catalog: TaskCatalog | str | os.PathLike,
        task_key: str = "task",
    ) -> None:
        super().__init__(keys=task_key)
        self.catalog = TaskCatalog.resolve(catalog)
        self.task_key = task_key
        missing = [t.name for t in self.catalog if t.name not in transforms]
        if missing:
            raise ValueError(f"PerTaskd: no transform for task(s) {missing}; got {sorted(transforms)}.")
        self.transforms = dict(transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PerTaskd:
        super().set_random_state(seed=seed, state=state)
        seen: set[int] = set()
        for name in sorted(self.transforms):
            t = self.transforms[name]
            if isinstance(t, Randomizable) and id(t) not in seen:
                seen.add(id(t))
                t.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw here: the inner transforms draw their own parameters."""

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        task = _task_of(self.catalog, data, self.task_key)
        return self.transforms[task.name](dict(data))


class TaskRandCropd(PerTaskd):
    """Pad to the task's patch, then crop one patch with 1/3 foreground oversampling (nnU-Net's scheme).

    Per task: ``SpatialPadd(keys, task.patch_size)`` then ``RandCropByLabelClassesd(keys, label_key,
    task.patch_size, ratios=[neg, pos / F, ..., pos / F], num_classes=task.num_classes, num_samples=1)`` with
    ``F`` foreground classes. With the default ``pos=1, neg=2`` one crop in three is centred on a foreground voxel
    of a foreground class drawn uniformly among those the case has (as nnU-Net v2 does, so that a small tumour is
    sampled as often as the organ around it), the others on a background voxel. Works for 2D and 3D tasks.
    Returns one dict (not MONAI's list of samples), with spatial shape ``task.patch_size``.

    Args:
        keys: keys to pad and crop, default ``("image", "label")``.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        label_key: key of the label that drives the crop centres, default ``"label"``.
        task_key: key of the task, default ``"task"``.
        pos: weight of foreground-centred crops, default ``1.0``.
        neg: weight of other crops, default ``2.0``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        catalog: TaskCatalog | str | os.PathLike | None = None,
        label_key: str = "label",
        task_key: str = "task",
        pos: float = 1.0,
        neg: float = 2.0,
    ) -> None:
        if catalog is None:
            raise ValueError("TaskRandCropd needs a catalog (TaskCatalog, catalog JSON path or built-in name).")
        catalog = TaskCatalog.resolve(catalog)
        crops = {
            t.name: Compose(
                [
                    SpatialPadd(keys, spatial_size=t.patch_size),
                    RandCropByLabelClassesd(
                        keys,
                        label_key,
                        spatial_size=t.patch_size,
                        ratios=[neg] + [pos / (t.num_classes - 1)] * (t.num_classes - 1),
                        num_classes=t.num_classes,
                        num_samples=1,
                        warn=False,
                    ),
                ]
            )
            for t in catalog
        }
        super().__init__(crops, catalog, task_key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = super().__call__(data)
        return out[0] if isinstance(out, list) else out


def augmentation_transforms(
    dims: int,
    image_key: str = "image",
    label_key: str = "label",
) -> list[Callable]:
    """nnU-Net's "moreDA" augmentation as used by UniSeg (reference: uniseg.md section 12), for one spatial rank.

    In order (probabilities per sample): rotation +-30 deg on every axis (one angle per axis; 2D: in-plane)
    p 0.2; scaling 0.7-1.4 p 0.2; Gaussian noise (std drawn in [0, 0.1]) p 0.1; Gaussian blur sigma 0.5-1
    p 0.2; multiplicative brightness 0.75-1.25 p 0.15; contrast 0.75-1.25 around the mean, range preserved
    p 0.15; low-resolution simulation (zoom 0.5-1) p 0.25; inverted gamma 0.7-1.5 p 0.1; gamma 0.7-1.5 p 0.3
    (both keep mean and std); mirroring of each spatial axis p 0.5. The spatial size is kept; the label is
    resampled with nearest neighbour so it stays integer-valued. Differences from batchgenerators: rotation and
    scaling are two resamplings (not one), padded with zeros; blur, noise and low-resolution are not drawn per
    channel.

    Args:
        dims: 2 or 3.
        image_key: default ``"image"``.
        label_key: default ``"label"``.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    keys = (image_key, label_key)
    linear = "trilinear" if dims == 3 else "bilinear"
    angle = np.pi / 6
    rot = {"range_x": angle} if dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    return [
        RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True, **rot),
        RandZoomd(
            keys,
            prob=0.2,
            min_zoom=0.7,
            max_zoom=1.4,
            mode=(linear, "nearest"),
            padding_mode="constant",
            keep_size=True,
        ),
        RandGaussianNoised(image_key, prob=0.1, mean=0.0, std=0.1, sample_std=True),
        RandGaussianSmoothd(image_key, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(image_key, factors=(-0.25, 0.25), prob=0.15),
        RandScaleIntensityFixedMeand(image_key, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(image_key, prob=0.25, zoom_range=(0.5, 1.0), upsample_mode=linear),
        RandAdjustContrastd(image_key, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd(image_key, prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True),
        *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dims)],
    ]


# ---------------------------------------------------------------------------------------------- pipelines
def _split_keys(keys: Sequence[str] | str) -> tuple[str, str | None]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if len(keys) not in (1, 2):
        raise ValueError(f"keys must be (image,) or (image, label), got {keys}.")
    return keys[0], (keys[1] if len(keys) == 2 else None)


def deterministic_transforms(
    catalog: TaskCatalog | str | os.PathLike,
    keys: Sequence[str] = ("image", "label"),
    reader: Any = None,
    task_key: str = "task",
    id_key: str = "task_id",
    default_task: str | int | None = None,
) -> list[Callable]:
    """The deterministic (cacheable) pre-processing, identical for training, validation and inference.

    ``AttachTaskd`` -> ``LoadImaged(reader)`` -> ``EnsureChannelFirstd`` -> ``Squeeze2Dd`` ->
    ``CheckTaskInputd`` -> ``TaskOrientationd("RAS")`` -> ``TaskSpacingd`` (bilinear image, nearest label) ->
    ``CropForegroundd`` (non-zero region of the raw image over all channels, ``allow_smaller=True``) ->
    ``NormalizeModalityd`` -> ``EnsureTyped``. Every spatial step is invertible, so ``Invertd`` on this list (or
    on a ``Compose`` that contains it) brings a prediction back to the grid of the input file.

    Output: ``image`` float32 ``(C, *spatial)``, ``label`` float32 ``(1, *spatial)`` with integer values,
    ``task`` (name) and ``task_id`` (int).

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        keys: ``(image_key, label_key)``, default ``("image", "label")``; ``("image",)`` for inference.
        reader: ``LoadImaged`` reader of files, default ``None`` = MONAI's choice by suffix (``NibabelReader`` for
            NIfTI; see the module docstring) and, for DICOM series folders,
            :class:`~uniseg_components.dicom.DicomSeriesReader`; ``"ITKReader"`` forces ITK for everything.
        task_key: default ``"task"``.
        id_key: default ``"task_id"``.
        default_task: task of items without ``task_key`` (MONAI Label sends ``{"image", "label"}`` items; a bundle's
            ``task``), default ``None`` (items must carry it). This is the one place a default task is set.
    """
    catalog = TaskCatalog.resolve(catalog)
    image_key, label_key = _split_keys(keys)
    keys = [image_key] + ([label_key] if label_key else [])
    modes = ["bilinear"] + (["nearest"] if label_key else [])
    return [
        AttachTaskd(catalog, task_key=task_key, id_key=id_key, image_key=image_key, default=default_task),
        with_series_reader(LoadImaged(keys, reader=reader, image_only=True)),
        EnsureChannelFirstd(keys),
        Squeeze2Dd(keys, catalog, task_key=task_key),
        CheckTaskInputd(catalog, image_key=image_key, label_key=label_key, task_key=task_key),
        TaskOrientationd(keys, catalog, task_key=task_key, axcodes="RAS"),
        TaskSpacingd(keys, catalog, task_key=task_key, mode=modes),
        CropForegroundd(
            keys, source_key=image_key, select_fn=nonzero, allow_smaller=True, start_coord_key=None, end_coord_key=None
        ),
        NormalizeModalityd(image_key, catalog, task_key=task_key),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True),
    ]


def random_transforms(
    catalog: TaskCatalog | str | os.PathLike,
    keys: Sequence[str] = ("image", "label"),
    augment: bool = True,
    task_key: str = "task",
) -> list[Callable]:
    """Training-time random transforms: per-task patch crop, then (optionally) the moreDA augmentation.

    ``TaskRandCropd`` (pad to the task patch, crop it with 1/3 foreground oversampling), then
    :func:`augmentation_transforms` for the task's spatial rank (one shared pipeline per rank). The output has
    the task's patch size: ``image`` ``(C, *task.patch_size)``, ``label`` ``(1, *task.patch_size)``.

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        keys: ``(image_key, label_key)``, default ``("image", "label")``.
        augment: add the augmentation, default ``True``; ``False`` gives only the crop (fast tests).
        task_key: default ``"task"``.
    """
    catalog = TaskCatalog.resolve(catalog)
    image_key, label_key = _split_keys(keys)
    if label_key is None:
        raise ValueError(f"random_transforms needs (image_key, label_key), got keys={tuple(keys)}.")
    out: list[Callable] = [TaskRandCropd((image_key, label_key), catalog, label_key=label_key, task_key=task_key)]
    if augment:
        by_dims = {dims: Compose(augmentation_transforms(dims, image_key, label_key)) for dims in catalog.dims}
        out.append(PerTaskd({t.name: by_dims[t.dims] for t in catalog}, catalog, task_key=task_key))
    return out


def train_transforms(
    catalog: TaskCatalog | str | os.PathLike,
    augment: bool = True,
    reader: Any = None,
    default_task: str | int | None = None,
) -> Compose:
    """``Compose(deterministic_transforms + random_transforms)`` for training items with labels.

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        augment: default ``True``; ``False`` only crops the patch.
        reader: ``LoadImaged`` reader, default ``None`` (see :func:`deterministic_transforms`).
        default_task: task of items without one, default ``None`` (see :func:`deterministic_transforms`).
    """
    catalog = TaskCatalog.resolve(catalog)
    return Compose(
        deterministic_transforms(catalog, reader=reader, default_task=default_task)
        + random_transforms(catalog, augment=augment)
    )


def val_transforms(
    catalog: TaskCatalog | str | os.PathLike, reader: Any = None, default_task: str | int | None = None
) -> Compose:
    """``Compose(deterministic_transforms)`` for validation: whole volumes, labels kept.

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        reader: ``LoadImaged`` reader, default ``None`` (see :func:`deterministic_transforms`).
        default_task: task of items without one, default ``None``.
    """
    return Compose(deterministic_transforms(catalog, ("image", "label"), reader, default_task=default_task))


def inference_transforms(
    catalog: TaskCatalog | str | os.PathLike,
    reader: Any = None,
    image_key: str = "image",
    default_task: str | int | None = None,
) -> Compose:
    """``Compose(deterministic_transforms(keys=(image_key,)))``: image only; invert predictions with ``Invertd``.
    Every inference config's ``preprocessing`` is this.

    Args:
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        reader: ``LoadImaged`` reader, default ``None`` (see :func:`deterministic_transforms`).
        image_key: default ``"image"``.
        default_task: task of items without one (MONAI Label sends ``{"image"}`` only), default ``None``.
    """
    return Compose(deterministic_transforms(catalog, keys=(image_key,), reader=reader, default_task=default_task))


class SaveLabelMapd(SaveImaged):
    """Write each ``(1, *spatial)`` label map of ``keys`` with :func:`~uniseg_components.io.save_label_map` (2D and
    3D, atomic), named like ``SaveImaged``: ``<output_dir>/[<name>/]<name>_<output_postfix><output_ext>`` with
    ``<name>`` the source file's name without extension (``filename_or_obj`` in the label's metadata, else in
    ``meta_key``'s).

    It is a ``SaveImaged`` (MONAI Label, for one, drops ``SaveImaged`` from a bundle's post-processing and returns
    the label itself), with the writing replaced by :func:`~uniseg_components.io.save_label_map`.

    Args:
        keys: keys of the label maps, e.g. ``"pred"``.
        output_dir: output folder, default ``"."``.
        output_postfix: appended to the name, default ``"seg"``.
        output_ext: default ``".nii.gz"``.
        separate_folder: one sub-folder per input file, default ``False``.
        meta_key: item key whose metadata names the source file when the label's does not, default ``"image"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = ".",
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        separate_folder: bool = False,
        meta_key: str = "image",
    ) -> None:
        super().__init__(
            keys, output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext, resample=False
        )
        self.output_dir = Path(output_dir)
        self.output_postfix, self.output_ext = str(output_postfix), str(output_ext)
        self.separate_folder, self.meta_key = bool(separate_folder), meta_key

    def output_path(self, source: str | os.PathLike) -> Path:
        """Where the label map of the image file ``source`` is written."""
        return output_path(source, self.output_dir, self.output_postfix, self.output_ext, self.separate_folder)

    def _source(self, d: Mapping[Any, Any], label: Any) -> str:
        for src in (label, d.get(self.meta_key)):
            meta = getattr(src, "meta", None) or {}
            source = meta.get("filename_or_obj")
            if source:
                return str(source)
        raise ValueError("SaveLabelMapd: no 'filename_or_obj' in the label's or the image's metadata to name the file.")

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            save_label_map(d[key], self.output_path(self._source(d, d[key])))
        return d


class SaveDicomSegd(SaveLabelMapd):
    """With ``enabled``, write each ``(1, X, Y, Z)`` label map of ``keys`` computed from a DICOM series as a DICOM SEG
    object that references the series (:func:`~uniseg_components.dicom.write_dicom_seg`: one segment per label, named
    by ``labels``, read back and checked), as ``<output_dir>/<name>_<output_postfix>.dcm`` beside the NIfTI map of
    :class:`SaveLabelMapd`. Inputs that are not DICOM series get no SEG (a SEG references its source images): a
    warning names them. Disabled, it passes the data through (the inference configs' ``dicom_seg: false``).

    Args:
        keys: keys of the label maps, e.g. ``"pred"``.
        labels: label value -> segment name (``TaskCatalog.label_names``); 0 (background) is no segment.
        output_dir: output folder, default ``"."``.
        output_postfix: appended to the name, default ``"seg"``.
        enabled: write the SEG, default ``True``.
        separate_folder: one sub-folder per input, default ``False``.
        meta_key: item key whose metadata names the source series when the label's does not, default ``"image"``.
        description: the SEG's SeriesDescription, default the segment names.

    Raises:
        ValueError: the map does not fit the series; the message names the input.
    """

    def __init__(
        self,
        keys: KeysCollection,
        labels: Mapping[int, str],
        output_dir: str | os.PathLike = ".",
        output_postfix: str = "seg",
        enabled: bool = True,
        separate_folder: bool = False,
        meta_key: str = "image",
        description: str = "",
    ) -> None:
        super().__init__(keys, output_dir, output_postfix, ".dcm", separate_folder, meta_key)
        self.labels = {int(v): str(n) for v, n in labels.items()}
        self.enabled, self.description = bool(enabled), str(description)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            source = self._source(d, d[key])
            if not is_series_reference(source):
                logger.warning("%s: not a DICOM series, so no DICOM SEG (it references its source series).", source)
                continue
            write_dicom_seg(d[key], source, self.labels, self.output_path(source), description=self.description)
        return d

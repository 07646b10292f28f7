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

    TaskRandCropd (patch placed as nnU-Net v1: foreground when the sampler's batch position says so; rotation and
    scaling in the same single resampling) -> the rest of nnU-Net's "moreDA" augmentation (intensity, mirroring)

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
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SaveImaged,
    Spacingd,
    SqueezeDim,
)
from monai.transforms.inverse import InvertibleTransform
from monai.transforms.utils import create_rotate
from monai.utils import MAX_SEED, TraceKeys, convert_to_dst_type, ensure_tuple_rep

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
    "FORCE_FG_KEY",
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


#: the item key through which the batch sampler tells :class:`TaskRandCropd` whether a sample must hold foreground
FORCE_FG_KEY = "force_fg"


def _crop_with_padding(img: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``img[:, start : start + size]`` on every spatial axis, zero-filled where the window leaves the image."""
    shape = img.shape[1:]
    out = img[(slice(None),) + tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, shape))]
    pad: list[int] = []
    for s, k, n in reversed(list(zip(start, size, shape))):
        pad += [max(0, -s), max(0, s + k - n)]
    return torch.nn.functional.pad(out, pad) if any(pad) else out.clone()


class TaskRandCropd(Randomizable, MapTransform):
    """One training patch per item: nnU-Net's patch placement with foreground oversampling, and its rotation and
    scaling done in the same single resampling.

    The patch (``task.patch_size``) is placed as nnU-Net v1 (used by UniSeg) places it:

    - a **foreground** sample is centred on a voxel of a foreground class drawn uniformly among the classes the
      case has (a small tumour is sampled as often as the organ around it), the voxel uniformly among that class's
      voxels, then shifted just enough to keep the patch inside the image;
    - any other sample is placed uniformly at random where it fits inside the image (it may hold foreground by
      chance). A case without foreground falls back to this. An image smaller than the patch is centred in it.

    Whether a sample is a foreground sample comes from the batch sampler through the item key ``force_key``
    (:class:`~uniseg_components.data.TaskBalancedBatchSampler` with ``oversample_foreground`` forces the last third
    of each batch, as nnU-Net does); for an item without that key it is drawn with probability ``oversample``.

    Then, per sample, rotation is drawn with probability ``prob_rotate`` (one angle per axis, uniform in
    ``+-rotation``; 2D: in-plane) and scaling with ``prob_scale`` (one factor for all axes: with probability 1/2
    uniform in ``[scale_range[0], 1)``, else in ``[1, scale_range[1]]``, nnU-Net's draw; a factor above 1 samples a
    larger region, i.e. zooms out). If either is drawn, the patch is sampled from the whole image around the
    patch's centre through the rotated and scaled grid (``grid_sample``: linear image, nearest label): one
    resampling, which is what nnU-Net's crop of an enlarged patch, spatial transform and centre crop compute, so the
    patch holds real image context wherever the image has it, never zero-filled corners. Voxels that fall outside
    the image are 0 (label 0), as nnU-Net pads. Otherwise the patch is cut out exactly. Works for 2D and 3D tasks.

    Args:
        keys: keys to crop, default ``("image", "label")``; every key is resampled on the same grid.
        catalog: a :class:`TaskCatalog`, a catalog JSON path or a built-in catalog name.
        label_key: key of the label that drives the foreground centres, default ``"label"``.
        task_key: key of the task, default ``"task"``.
        oversample: chance of a foreground sample for items without ``force_key``, default ``1/3``.
        prob_rotate: default ``0.0`` (the training pipeline's augmentation uses 0.2).
        prob_scale: default ``0.0`` (the training pipeline's augmentation uses 0.2).
        rotation: largest rotation in radians per axis, default ``pi / 6`` (30 degrees).
        scale_range: ``(min, max)`` coordinate scale, default ``(0.7, 1.4)``.
        mode: interpolation per key, default ``("bilinear", "nearest")``.
        force_key: the item key that forces (``True``) or forbids (``False``) a foreground sample, default
            ``"force_fg"`` (removed from the item).

    Raises:
        ValueError: without a catalog, for ``oversample`` outside ``[0, 1]``, a bad ``scale_range``, or an item
            without ``label_key``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        catalog: TaskCatalog | str | os.PathLike | None = None,
        label_key: str = "label",
        task_key: str = "task",
        oversample: float = 1.0 / 3.0,
        prob_rotate: float = 0.0,
        prob_scale: float = 0.0,
        rotation: float = float(np.pi / 6),
        scale_range: Sequence[float] = (0.7, 1.4),
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        force_key: str = FORCE_FG_KEY,
    ) -> None:
        if catalog is None:
            raise ValueError("TaskRandCropd needs a catalog (TaskCatalog, catalog JSON path or built-in name).")
        if not 0.0 <= float(oversample) <= 1.0:
            raise ValueError(f"oversample must be in [0, 1], got {oversample}.")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {tuple(scale_range)}.")
        super().__init__(keys)
        self.catalog = TaskCatalog.resolve(catalog)
        self.label_key, self.task_key, self.force_key = label_key, task_key, force_key
        self.oversample = float(oversample)
        self.prob_rotate, self.prob_scale = float(prob_rotate), float(prob_scale)
        self.rotation, self.scale_range = abs(float(rotation)), (lo, hi)
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def randomize(self, data: Any = None) -> None:
        """Nothing drawn ahead: :meth:`place` and :meth:`draw` draw from ``self.R`` per sample."""

    def place(self, label: torch.Tensor, patch: Sequence[int], force: bool, num_classes: int) -> list[int]:
        """The first voxel of the patch on every spatial axis of ``label`` ``(1, *spatial)`` (negative where the
        image is smaller than the patch and gets padded); ``num_classes`` (with the background) bounds the search
        for the foreground classes the case has."""
        shape = label.shape[1:]
        lo = [-((p - n) // 2) if n < p else 0 for n, p in zip(shape, patch)]
        hi = [a if n < p else n - p for a, n, p in zip(lo, shape, patch)]
        if force:
            lab = label[0].as_tensor() if isinstance(label, MetaTensor) else label[0]
            present = [c for c in range(1, num_classes) if bool((lab == c).any())]
            if present:
                where = torch.nonzero(lab == present[int(self.R.randint(len(present)))])
                voxel = where[int(self.R.randint(len(where)))].tolist()
                return [min(max(v - p // 2, a), b) for v, p, a, b in zip(voxel, patch, lo, hi)]
        return [int(self.R.randint(a, b + 1)) for a, b in zip(lo, hi)]

    def draw(self, dims: int) -> tuple[tuple[float, ...] | None, float | None]:
        """Draw ``(angles or None, scale or None)`` for one sample of spatial rank ``dims``."""
        angles = None
        if self.R.rand() < self.prob_rotate:
            angles = tuple(float(a) for a in self.R.uniform(-self.rotation, self.rotation, 1 if dims == 2 else 3))
        scale = None
        if self.R.rand() < self.prob_scale:
            lo, hi = self.scale_range
            scale = float(self.R.uniform(lo, 1.0) if self.R.rand() < 0.5 and lo < 1 else self.R.uniform(max(lo, 1), hi))
        return angles, scale

    def coordinates(
        self, start: Sequence[int], patch: Sequence[int], angles: Sequence[float] | None, scale: float | None
    ) -> torch.Tensor:
        """Where each voxel of the patch samples the image: ``(dims, *patch)`` voxel coordinates, the patch's own
        grid around its centre, scaled, rotated (MONAI's ``create_rotate`` convention) and moved to the patch centre
        ``start + (patch - 1) / 2``."""
        dims = len(patch)
        matrix = np.eye(dims)
        if angles is not None:
            matrix = matrix @ np.asarray(create_rotate(dims, angles))[:dims, :dims]
        if scale is not None:
            matrix = matrix * scale
        axes = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch]
        local = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(dims, -1)
        centre = torch.tensor([s + (p - 1) / 2 for s, p in zip(start, patch)], dtype=torch.float32)
        coords = torch.as_tensor(matrix, dtype=torch.float32) @ local + centre[:, None]
        return coords.reshape(dims, *patch)

    @staticmethod
    def sample(img: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``img`` ``(C, *spatial)`` at the voxel coordinates ``coords`` ``(dims, *out)`` (``torch.grid_sample``:
        ``"bilinear"`` is linear on every axis, ``"nearest"``; 0 outside the image); the result keeps ``img``'s
        type and metadata."""
        data = img.as_tensor() if isinstance(img, MetaTensor) else img
        shape = data.shape[1:]
        half = torch.tensor([(n - 1) / 2 if n > 1 else 1.0 for n in shape], dtype=torch.float32)
        norm = (coords.reshape(len(shape), -1) - half[:, None]) / half[:, None]  # [-1, 1] at the first / last voxel
        grid = norm.flip(0).T.reshape(1, *coords.shape[1:], len(shape))  # grid_sample wants (x, y, z) = reversed axes
        out = torch.nn.functional.grid_sample(
            data[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True
        )[0].to(data.dtype)
        return convert_to_dst_type(out, img)[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        task = _task_of(self.catalog, d, self.task_key)
        force = d.pop(self.force_key, None)
        force = bool(self.R.rand() < self.oversample) if force is None else bool(force)
        if self.label_key not in d:
            raise ValueError(f"TaskRandCropd: the item of task {task.name!r} has no {self.label_key!r}.")
        patch = tuple(task.patch_size)
        start = self.place(d[self.label_key], patch, force, task.num_classes)
        angles, scale = self.draw(task.dims)
        coords = None if angles is None and scale is None else self.coordinates(start, patch, angles, scale)
        for key, mode in self.key_iterator(d, self.mode):
            if coords is None:
                d[key] = _crop_with_padding(d[key], start, patch)
            else:
                d[key] = self.sample(d[key], coords, "bilinear" if mode in ("bilinear", "trilinear") else mode)
        return d


def augmentation_transforms(
    dims: int,
    image_key: str = "image",
    label_key: str = "label",
) -> list[Callable]:
    """The intensity and mirroring part of nnU-Net's "moreDA" augmentation as used by UniSeg (reference: uniseg.md
    section 12), for one spatial rank; rotation and scaling come before it, in :class:`TaskRandCropd`.

    In order (probabilities per sample): Gaussian noise (std drawn in [0, 0.1]) p 0.1; Gaussian blur sigma 0.5-1
    p 0.2; multiplicative brightness 0.75-1.25 p 0.15; contrast 0.75-1.25 around the mean, range preserved
    p 0.15; low-resolution simulation (zoom 0.5-1) p 0.25; inverted gamma 0.7-1.5 p 0.1; gamma 0.7-1.5 p 0.3
    (both keep mean and std); mirroring of each spatial axis p 0.5. Differences from batchgenerators: blur, noise
    and low-resolution are not drawn per channel.

    Args:
        dims: 2 or 3.
        image_key: default ``"image"``.
        label_key: default ``"label"``.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    keys = (image_key, label_key)
    linear = "trilinear" if dims == 3 else "bilinear"
    return [
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
    """Training-time random transforms: the patch crop, then (optionally) nnU-Net's augmentation.

    :class:`TaskRandCropd` places the patch (foreground oversampling) and, with ``augment``, rotates (p 0.2, +-30
    degrees per axis) and scales it (p 0.2, 0.7-1.4) in the same single resampling; then, with ``augment``,
    :func:`augmentation_transforms` for the task's spatial rank (one shared pipeline per rank). The output has the
    task's patch size: ``image`` ``(C, *task.patch_size)``, ``label`` ``(1, *task.patch_size)``.

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
    p = 0.2 if augment else 0.0
    crop = TaskRandCropd((image_key, label_key), catalog, label_key, task_key, prob_rotate=p, prob_scale=p)
    out: list[Callable] = [crop]
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

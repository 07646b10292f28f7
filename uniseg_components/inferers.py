# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Task-aware sliding-window inference, with optional mirroring TTA and an all-tasks path."""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Invertd, LoadImage, MapTransform

from .tasks import TaskSpec, read_json
from .transforms import inference_transforms

__all__ = [
    "image_stem",
    "SaveLabelMapd",
    "MirroredPredictor",
    "TaskSlidingWindowInferer",
    "MergedTasksInferer",
    "HermesMergedInferer",
    "targets_to_label",
    "TargetsToLabeld",
    "TaskPredictor",
    "merge_task_labels",
    "tasks_for_image",
    "save_label_map",
    "list_images",
]


class MirroredPredictor:
    """Wrap a predictor so that it averages the logits over every combination of flips of ``mirror_axes``.

    Args:
        predictor: callable ``(x, *args, **kwargs) -> logits`` (or a tuple/list of logits).
        mirror_axes: spatial axes (0-based, MONAI order) to flip; ``(0, 1, 2)`` gives 8 passes in 3D, ``()`` one.
    """

    def __init__(self, predictor: Callable[..., Any], mirror_axes: Sequence[int] = ()) -> None:
        self.predictor = predictor
        self.mirror_axes = tuple(int(a) for a in mirror_axes)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if any(a < 0 or a >= x.ndim - 2 for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {self.mirror_axes} do not fit a {x.ndim - 2}D input.")
        combos = [c for r in range(len(self.mirror_axes) + 1) for c in itertools.combinations(self.mirror_axes, r)]
        total: Any = None
        for combo in combos:
            dims = [a + 2 for a in combo]
            out = self.predictor(torch.flip(x, dims) if dims else x, *args, **kwargs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            outs = [torch.flip(o, dims) if dims else o for o in outs]
            total = outs if total is None else [t + o for t, o in zip(total, outs)]
        total = [t / len(combos) for t in total]
        return tuple(total) if isinstance(out, (tuple, list)) else total[0]


class TaskSlidingWindowInferer(SlidingWindowInferer):
    """Sliding-window inference that passes the task to the network, with optional mirroring TTA.

    Defaults follow UniSeg / nnU-Net: Gaussian importance weighting and 50% overlap. Use it as any MONAI inferer:
    ``inferer(image, network, task_id=3)`` calls ``network(window, task_id=3)`` on every window. The all-tasks
    path :meth:`all_tasks` runs ``network.forward_all_tasks`` on every window: the encoder once per window, the
    decoder once per task.

    Args:
        roi_size: window size, normally the training patch (divisible by the network's total stride).
        sw_batch_size: windows per forward pass, default 1.
        overlap: fraction of overlap between windows, default 0.5.
        mode: ``"gaussian"`` (default) or ``"constant"`` blending.
        mirror_axes: spatial axes for mirroring test-time augmentation, default ``()`` (off); UniSeg used all.
        task_id: task used when a call gives none, default ``None`` (the caller must pass ``task_id``). Binding it
            lets callers that only do ``inferer(inputs, network)`` (MONAI Label, a bundle's ``inferer`` key)
            segment one task; an explicit ``task_id=`` keyword still wins.
        catalog: the network's task catalog, default ``None``. When given, each call uses the patch of the task it
            segments (``catalog[task_id].patch_size``, 2D for a 2D task) as window instead of ``roi_size``, so one
            inferer serves the 2D and 3D tasks of MedUniSeg; ``roi_size`` remains the window of calls without a task.
        kwargs: any other :class:`monai.inferers.SlidingWindowInferer` argument (``sw_device``, ``device``,
            ``progress``...).

    Mirroring uses the axes of ``mirror_axes`` that exist in the input (``(0, 1, 2)`` flips x and y of a 2D image).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        mode: str = "gaussian",
        mirror_axes: Sequence[int] = (),
        task_id: int | None = None,
        catalog: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs)
        self.mirror_axes = tuple(mirror_axes)
        self.task_id = None if task_id is None else int(task_id)
        self.catalog = catalog

    def roi_for(self, inputs: torch.Tensor, task_id: Any = None) -> tuple[int, ...] | Any:
        """The window for ``inputs`` ``(B, C, *spatial)`` of task ``task_id``: the task's patch when a catalog is
        bound and a task given, else ``roi_size``.

        Raises:
            ValueError: the window's rank is not the input's (e.g. a 2D image with a 3D ``roi_size`` and no catalog).
        """
        roi = self.roi_size
        if self.catalog is not None and task_id is not None:
            task = self.catalog[int(torch.as_tensor(task_id).reshape(-1)[0])]
            roi = tuple(task.patch_size)
            where = f"task {task.name!r} ({task.dims}D, patch {list(roi)})"
        else:
            where = f"roi_size {roi}"
        rank = inputs.ndim - 2
        if isinstance(roi, Sequence) and len(roi) != rank:
            raise ValueError(
                f"{where} does not fit a {rank}D input of shape {tuple(inputs.shape)}; give the inferer the catalog "
                "(catalog=) so that each task uses its own patch, or a roi_size of the input's rank."
            )
        return roi

    def _sliding(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, roi_task: Any = None, **kwargs: Any
    ) -> Any:
        axes = tuple(a for a in self.mirror_axes if a < inputs.ndim - 2)
        predictor = MirroredPredictor(network, axes) if axes else network
        roi = self.roi_for(inputs, roi_task)
        inferer: SlidingWindowInferer = self
        if tuple(roi) != tuple(self.roi_size):  # a shallow copy with the task's window (no cached weight map)
            inferer = copy.copy(self)
            inferer.roi_size, inferer.roi_weight_map = roi, None
        return SlidingWindowInferer.__call__(inferer, inputs, predictor, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inputs``: ``(B, C, *spatial)``; returns the stitched logits ``(B, K, *spatial)``.

        ``network`` is called as ``network(window, *args, task_id=...)``; ``task_id`` defaults to the bound one.
        """
        if self.task_id is not None and not args and "task_id" not in kwargs:
            kwargs["task_id"] = self.task_id
        return self._sliding(inputs, network, *args, roi_task=kwargs.get("task_id"), **kwargs)

    def all_tasks(
        self, inputs: torch.Tensor, network: Any, task_ids: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Logits of several tasks from one sliding-window pass sharing the encoder.

        Args:
            inputs: ``(B, C, *spatial)``.
            network: a network with ``forward_all_tasks(x, task_ids)`` (``UniSeg``).
            task_ids: tasks to segment, default all of the network's tasks. With a bound catalog the window is the
                patch of the first of them (tasks segmented together share the input, hence the rank).

        Returns:
            one stitched logits tensor ``(B, K_t, *spatial)`` per task, in ``task_ids`` order.
        """
        if not hasattr(network, "forward_all_tasks"):
            raise ValueError(f"{type(network).__name__} has no forward_all_tasks(); it cannot segment all tasks.")
        ids = None if task_ids is None else [int(t) for t in task_ids]

        def predict(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(network.forward_all_tasks(x, ids))

        out = self._sliding(inputs, predict, roi_task=None if not ids else ids[0])
        # MONAI unpacks a one-element tuple into a tensor: keep one entry per task
        return [out] if isinstance(out, torch.Tensor) else list(out)


class MergedTasksInferer(TaskSlidingWindowInferer):
    """All tasks of one modality in one call: the merged label map that ``--task all`` writes.

    ``inferer(inputs, network)`` runs :meth:`TaskSlidingWindowInferer.all_tasks` (encoder once per window, decoder
    once per task), takes the argmax of each task and merges the maps with the tasks' label offsets
    (:func:`merge_task_labels`, later tasks win overlaps). Any ``task_id`` keyword (e.g. from a
    ``TaskEvaluator`` batch) is ignored: the tasks are bound here. The result is already a label map, so the
    post-processing must not apply softmax/argmax again and must invert it with nearest interpolation.

    Args:
        roi_size: window size, normally the training patch.
        tasks: the tasks to segment (``TaskSpec`` with ``id`` and ``label_offset``, e.g.
            ``catalog.tasks_for_channels(["CT"])``); at least one.
        sw_batch_size: windows per forward pass, default 1.
        overlap: window overlap, default 0.5.
        mode: ``"gaussian"`` (default) or ``"constant"``.
        mirror_axes: mirroring TTA axes, default ``()``.
        catalog: the catalog, default ``None``; when given the window is the first task's patch (see
            :class:`TaskSlidingWindowInferer`).
        kwargs: other :class:`monai.inferers.SlidingWindowInferer` arguments.

    Returns (when called):
        float32 merged label map ``(B, 1, *spatial)``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        tasks: Sequence[TaskSpec],
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        mode: str = "gaussian",
        mirror_axes: Sequence[int] = (),
        catalog: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size, sw_batch_size, overlap, mode, mirror_axes, catalog=catalog, **kwargs)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError(
                f"{type(self).__name__} needs at least one task (e.g. catalog.tasks_for_channels(['CT']))."
            )

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``inputs``: ``(B, C, *spatial)``; returns the merged label map ``(B, 1, *spatial)`` (float32)."""
        logits = self.all_tasks(inputs, network, [t.id for t in self.tasks])
        labels = [lg.float().argmax(1, keepdim=True) for lg in logits]
        return merge_task_labels(labels, self.tasks).float()


def targets_to_label(
    pred: torch.Tensor,
    threshold: float = 0.5,
    sigmoid: bool = True,
    target_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-target maps (one sigmoid mask per target, e.g. Hermes' output) to one label map.

    A voxel is 0 where every target's probability is below ``threshold``, else ``argmax + 1`` over the targets
    (or ``target_ids[argmax] + 1``: the catalog's merged label of a Hermes target). Targets may overlap; in the
    label map an overlap goes to the most probable target. The overlapping masks themselves are
    ``probabilities >= threshold`` per channel (keep the per-target output, ``multilabel``, when they matter).

    Args:
        pred: ``(n, *spatial)`` logits (or probabilities with ``sigmoid=False``), or 3D ``(B, n, X, Y, Z)``.
        threshold: probability threshold, default 0.5.
        sigmoid: apply a sigmoid first, default ``True``.
        target_ids: value - 1 of each channel, default ``None`` (channel ``j`` gives label ``j + 1``).

    Returns:
        ``(1, *spatial)`` (or ``(B, 1, *spatial)``) integer label map, ``int64``.
    """
    batched = pred.ndim == 5  # (B, n, X, Y, Z); (n, X, Y, Z) and 2D (n, X, Y) are channel-first
    prob = torch.sigmoid(pred.float()) if sigmoid else pred.float()
    ch = 1 if batched else 0
    if target_ids is not None and len(target_ids) != prob.shape[ch]:
        raise ValueError(f"target_ids has {len(target_ids)} entries for {prob.shape[ch]} channels.")
    best, idx = prob.max(dim=ch, keepdim=True)
    if target_ids is not None:
        idx = torch.as_tensor(list(target_ids), dtype=torch.long, device=idx.device)[idx]
    return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))


class TargetsToLabeld(MapTransform):
    """Dictionary transform for bundle post-processing: per-target logits ``(n, *spatial)`` -> label map
    ``(1, *spatial)`` with :func:`targets_to_label` (0 where no target reaches ``threshold``, else the most
    probable target's channel + 1).

    Args:
        keys: keys to convert.
        threshold: probability threshold, default 0.5.
        sigmoid: apply a sigmoid first (the input is logits), default ``True``.
        allow_missing_keys: default ``False``.
    """

    def __init__(
        self, keys: KeysCollection, threshold: float = 0.5, sigmoid: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold, self.sigmoid = float(threshold), bool(sigmoid)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            label = targets_to_label(torch.as_tensor(img), self.threshold, self.sigmoid)
            if isinstance(img, MetaTensor):
                label = MetaTensor(label, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = label
        return d


class HermesMergedInferer(MergedTasksInferer):
    """All targets of several datasets of one modality in **one** Hermes pass per window, merged into one map.

    The request is every target of ``tasks`` (in order) plus one null token and their shared modality; the
    stitched per-target logits become a label map with :func:`targets_to_label` using the catalog's merged labels
    (target id + 1 = ``label_offset + class``): 0 where no target reaches 0.5, else the most probable target.
    Any ``task_id`` keyword is ignored (the tasks are bound here). The result is a label map: post-processing must
    not apply a sigmoid/argmax again and must invert it with nearest interpolation.

    Args:
        roi_size: window size, normally the training patch.
        tasks: the tasks to segment (``TaskSpec`` with ``label_offset``, all with the same modalities, e.g.
            ``catalog.tasks_for_channels(["CT"])``); at least one.
        sw_batch_size: windows per forward pass, default 1.
        overlap: window overlap, default 0.5.
        mode: ``"gaussian"`` (default) or ``"constant"``.
        mirror_axes: mirroring TTA axes, default ``()``.
        threshold: probability threshold, default 0.5.
        kwargs: other :class:`monai.inferers.SlidingWindowInferer` arguments.

    Returns (when called):
        float32 merged label map ``(B, 1, *spatial)``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        tasks: Sequence[TaskSpec],
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        mode: str = "gaussian",
        mirror_axes: Sequence[int] = (),
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size, tasks, sw_batch_size, overlap, mode, mirror_axes, **kwargs)
        mods = {tuple(t.modalities) for t in self.tasks}
        if len(mods) != 1:
            raise ValueError(
                f"HermesMergedInferer segments tasks of one modality in one pass, got tasks "
                f"{[t.name for t in self.tasks]} with modalities {sorted(mods)}."
            )
        self.threshold = float(threshold)
        #: global target ids of the request, in order (label value = target id + 1)
        self.target_ids = [int(t.label_offset) + c - 1 for t in self.tasks for c in range(1, t.num_classes)]

    def request(self, network: Any, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(task_ids (1, n + 1), modality_id (1,))`` for ``network`` (a ``Hermes``): the targets and one null."""
        if not hasattr(network, "task_modality"):
            raise ValueError(f"HermesMergedInferer needs a Hermes network, got {type(network).__name__}.")
        ids = torch.tensor([self.target_ids + [-1]], dtype=torch.long, device=device)
        mod = torch.tensor([network.task_modality(self.tasks[0].id)], dtype=torch.long, device=device)
        return ids, mod

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``inputs``: ``(B, C, *spatial)``; returns the merged label map ``(B, 1, *spatial)`` (float32)."""
        net = network.module if hasattr(network, "module") else network
        ids, mod = self.request(net, inputs.device)
        logits = self._sliding(inputs, network, task_ids=ids, modality_id=mod)
        logits = logits[:, : len(self.target_ids)]
        return targets_to_label(logits, self.threshold, True, self.target_ids).float()


def list_images(source: str | os.PathLike | Sequence[Any], pattern: str = "*.nii*") -> list[dict[str, Any]]:
    """Inference items ``[{"image": path}, ...]`` from a folder, a datalist JSON file or a list.

    Args:
        source: a folder (its files matching ``pattern``, sorted), a ``.json`` file holding a list of paths or
            items (or a dict with a ``"test"``, ``"testing"``, ``"validation"`` or ``"val"`` list), a single image
            file, or a list of paths / item dicts. Items keep only their ``"image"`` and ``"task"`` entries (an
            item's own task overrides the config's default in single-task mode).
        pattern: glob for folders, default ``"*.nii*"``.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: the source holds no image.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no image folder, image or datalist at {str(path)!r}.")
        if path.is_dir():
            entries: Sequence[Any] = sorted(str(p) for p in path.glob(pattern) if p.is_file())
        elif path.suffix == ".json":
            loaded = read_json(path, "image list")
            if isinstance(loaded, dict):
                key = next((k for k in ("test", "testing", "validation", "val") if k in loaded), None)
                if key is None:
                    raise ValueError(f"{path}: expected a list or a dict with a 'test' or 'validation' list.")
                loaded = loaded[key]
            entries = loaded
        else:
            entries = [str(path)]
    else:
        entries = list(source)
    # keep only what inference reads: a prepared datalist's items also carry labels, which are not loaded
    items = [
        {k: v for k, v in e.items() if k in ("image", "task")} if isinstance(e, Mapping) else {"image": str(e)}
        for e in entries
    ]
    if any("image" not in item for item in items):
        raise ValueError(f"every item of {source!r} needs an 'image' entry.")
    if not items:
        raise ValueError(f"no image found in {source!r} (pattern {pattern!r}).")
    return items


def merge_task_labels(label_maps: Sequence[torch.Tensor], tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """Merge per-task label maps into one map with the catalog's global label offsets.

    Foreground class ``c`` of task ``t`` becomes ``t.label_offset + c``; where tasks overlap, the later task in
    ``tasks`` wins (as in UniSeg's all-task mode).

    Args:
        label_maps: one integer label map per task, all of the same shape.
        tasks: the matching task specs (with ``label_offset`` set, as a catalog assigns them).
    """
    if len(label_maps) != len(tasks) or not label_maps:
        raise ValueError(f"need one label map per task, got {len(label_maps)} maps for {len(tasks)} tasks.")
    merged = torch.zeros_like(label_maps[0], dtype=torch.int16)
    for lm, task in zip(label_maps, tasks):
        if lm.shape != merged.shape:
            raise ValueError(f"label map of task {task.name!r} has shape {tuple(lm.shape)}, expected {merged.shape}.")
        fg = lm > 0
        merged[fg] = (lm[fg] + int(task.label_offset or 0)).to(torch.int16)
    return merged


class TaskPredictor:
    """Image files in, label maps on the grid of the input file out: the inference path of ``uniseg infer``.

    Per image: the catalog's deterministic transforms for the task (load, orientation, task spacing, foreground
    crop, modality normalisation), task-aware sliding-window inference, then

    * one task: softmax over the task's classes -> ``Invertd`` (probabilities resampled back to the input grid)
      -> argmax;
    * all tasks (:meth:`predict_all`): one encoder pass per window, argmax per task, merge with the catalog's
      label offsets (later tasks win overlaps) -> ``Invertd`` with nearest interpolation.

    A :class:`~uniseg_components.networks.Hermes` (one sigmoid channel per target, no background channel) gets
    sigmoid probabilities -> ``Invertd`` -> :func:`targets_to_label` for one task, and
    :class:`HermesMergedInferer` (all targets in one pass) for all tasks.

    Args:
        network: a trained network (``UniSeg``); it is moved to ``device`` and put in eval mode.
        catalog: its task catalog.
        roi_size: sliding-window size, default ``None``: the network plan's patch, and, when the catalog mixes 2D and
            3D tasks, each task's own patch (``catalog[task].patch_size``, 2D for a 2D task); a given size is used
            for every task.
        sw_batch_size: windows per forward pass, default 2.
        overlap: window overlap, default 0.5.
        mirror_axes: mirroring TTA axes, default ``()``.
        device: default CUDA when available else CPU.
        amp: autocast on CUDA, default ``True`` on CUDA.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        catalog: Any,
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        mirror_axes: Sequence[int] = (),
        device: str | torch.device | None = None,
        amp: bool | None = None,
    ) -> None:
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.network = network.to(self.device).eval()
        self.catalog = catalog
        plan = network.plan  # type: ignore[union-attr]
        roi = roi_size if roi_size is not None else plan.patch_size
        # per-task windows for a catalog mixing ranks (MedUniSeg); one rank keeps the plan's patch (UniSeg's prompt
        # is sized for it)
        per_task = roi_size is None and any(t.dims != plan.spatial_dims for t in catalog)
        self.inferer = TaskSlidingWindowInferer(
            roi, sw_batch_size, overlap, mirror_axes=mirror_axes, catalog=catalog if per_task else None
        )
        from .networks.hermes import Hermes

        self.sigmoid_targets = isinstance(network, Hermes)
        self.preprocessing = inference_transforms(catalog)
        self._invert_linear = Compose(
            [Invertd("pred", self.preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)]
        )
        self._invert_nearest = Compose(
            [Invertd("pred", self.preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)]
        )

    def _prepare(self, image: Any, task: Any) -> tuple[dict[str, Any], torch.Tensor]:
        try:
            data = self.preprocessing({"image": image, "task": task})
        except RuntimeError as e:
            # MONAI wraps a transform's error as RuntimeError("applying transform ..."): surface the original one,
            # which names the file, the task and what was expected
            cause: BaseException = e
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is e:
                raise
            raise cause from None
        return data, data["image"].unsqueeze(0).to(self.device)

    def _run(self, fn: Callable[[], Any]) -> Any:
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
            return fn()

    def predict(self, image: Any, task: int | str) -> torch.Tensor:
        """Label map ``(1, *spatial)`` of ``task`` on the input file's grid (a MetaTensor with its affine).

        Args:
            image: a file path (or anything ``LoadImaged`` reads).
            task: task name or id.
        """
        data, x = self._prepare(image, task)
        tid = int(data["task_id"])
        logits = self._run(lambda: self.inferer(x, self.network, task_id=tid))
        activation = torch.sigmoid if self.sigmoid_targets else partial(torch.softmax, dim=0)
        data["pred"] = activation(logits[0].float()).cpu()
        data["image"] = data["image"].cpu()
        pred = self._invert_linear(data)["pred"]
        if self.sigmoid_targets:
            return targets_to_label(pred, sigmoid=False).to(torch.int16)
        return pred.argmax(0, keepdim=True).to(torch.int16)

    def tasks_for_image(self, image: Any, modalities: Sequence[str] | None = None) -> list[Any]:
        """The tasks ``--task all`` segments for ``image``: see :func:`tasks_for_image`."""
        return tasks_for_image(self.catalog, image, modalities)

    def predict_all(self, image: Any, modalities: Sequence[str] | None = None) -> tuple[torch.Tensor, list[Any]]:
        """Merged label map ``(1, *spatial)`` of every task for the image's modalities, and those tasks.

        Preprocessing (spacing, normalisation) follows the first of these tasks.
        """
        tasks = self.tasks_for_image(image, modalities)
        data, x = self._prepare(image, tasks[0].name)
        if self.sigmoid_targets:  # every target of these tasks in one pass
            inf = self.inferer
            merged = HermesMergedInferer(
                inf.roi_size, tasks, inf.sw_batch_size, inf.overlap, mirror_axes=inf.mirror_axes
            )
            data["pred"] = self._run(lambda: merged(x, self.network))[0].float().cpu()
        else:
            logits = self._run(lambda: self.inferer.all_tasks(x, self.network, [t.id for t in tasks]))
            labels = [lg[0].float().argmax(0, keepdim=True).cpu() for lg in logits]
            data["pred"] = merge_task_labels(labels, tasks).float()
        data["image"] = data["image"].cpu()
        pred = self._invert_nearest(data)["pred"]
        return pred.round().to(torch.int16), tasks


def tasks_for_image(catalog: Any, image: Any, modalities: Sequence[str] | None = None) -> list[TaskSpec]:
    """The tasks ``--task all`` segments for one image: those of the catalog with the given ``modalities`` (or,
    when not given, with the only modality combination of the catalog that has the image's channel count), and,
    when these tasks mix 2D and 3D, only those of the image's rank (a ``(X, Y, 1)`` file counts as 2D for 2D tasks).

    Args:
        catalog: the network's :class:`~uniseg_components.tasks.TaskCatalog`.
        image: a file path (or anything ``LoadImage`` reads); loaded only when the channel count or rank is needed.
        modalities: the image's channel modalities (e.g. ``["CT", "PET"]``), default ``None``.

    Raises:
        ValueError: no task fits, or several modality combinations fit and ``modalities`` is needed.
    """
    loaded: list[Any] = []

    def load() -> Any:
        if not loaded:
            loaded.append(LoadImage(image_only=True, ensure_channel_first=True)(image))
        return loaded[0]

    if modalities is not None:
        tasks = catalog.tasks_for_channels(list(modalities))
        if not tasks:
            raise ValueError(
                f"no task in catalog {catalog.name!r} takes modalities {list(modalities)}; known "
                f"combinations: {sorted({tuple(t.modalities) for t in catalog})}."
            )
    else:
        n = int(load().shape[0])
        combos = sorted({tuple(t.modalities) for t in catalog if t.num_channels == n})
        if len(combos) != 1:
            raise ValueError(
                f"{image}: {n} channel(s) fit {'no' if not combos else 'several'} modality combination(s) of "
                f"catalog {catalog.name!r} {combos}; pass modalities explicitly (e.g. --modality CT)."
            )
        tasks = catalog.tasks_for_channels(list(combos[0]))
    if len({t.dims for t in tasks}) > 1:
        spatial = tuple(load().shape[1:])
        ranks = {len(spatial)} | ({2} if len(spatial) == 3 and spatial[-1] == 1 else set())
        kept = [t for t in tasks if t.dims in ranks]
        if not kept:
            raise ValueError(
                f"{image}: a {len(spatial)}D image (spatial shape {spatial}) fits none of the tasks "
                f"{[f'{t.name} ({t.dims}D)' for t in tasks]} of modalities {list(tasks[0].modalities)}."
            )
        if len({t.dims for t in kept}) > 1:  # a (X, Y, 1) file with 2D and 3D candidates: a 2D image
            kept = [t for t in kept if t.dims == 2]
        tasks = kept
    return tasks


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image extension: ``"case_001.nii.gz"`` -> ``"case_001"``, ``"x.mha"`` -> ``"x"``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def save_label_map(label: torch.Tensor, path: str | Any) -> Any:
    """Write a ``(1, *spatial)`` label map as NIfTI atomically (temporary file renamed into place).

    Written with nibabel directly: a 2D map gets its 2D affine embedded in a 4x4 one (MONAI's writer fails on some
    2D maps, e.g. those of ``(X, Y, 1, C)`` RGB files). Values below 256 are stored as ``uint8``, else ``int16``.

    Args:
        label: integer label map, a MetaTensor carrying the affine of the grid it lies on (identity otherwise).
        path: output ``.nii.gz`` path; parent folders are created.
    """
    import nibabel as nib
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = torch.as_tensor(label).detach().cpu()[0].numpy()
    affine = np.eye(4)
    if isinstance(label, MetaTensor):
        a = np.asarray(label.affine.detach().cpu().numpy(), dtype=np.float64)
        r = a.shape[0] - 1  # spatial rank of the affine
        affine[:r, :r], affine[:r, 3] = a[:r, :r], a[:r, r]
    dtype = np.uint8 if int(arr.max(initial=0)) < 256 and int(arr.min(initial=0)) >= 0 else np.int16
    img = nib.Nifti1Image(arr.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes)}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


class SaveLabelMapd(MapTransform):
    """Write each ``(1, *spatial)`` label map of ``keys`` with :func:`save_label_map` (2D and 3D, atomic), named like
    ``SaveImaged``: ``<output_dir>/[<name>/]<name>_<output_postfix><output_ext>`` with ``<name>`` the source file's
    name without extension (``filename_or_obj`` in the label's metadata, else in ``meta_key``'s).

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
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.output_postfix, self.output_ext = str(output_postfix), str(output_ext)
        self.separate_folder, self.meta_key = bool(separate_folder), meta_key

    def _name(self, d: Mapping[Any, Any], label: Any) -> str:
        for src in (label, d.get(self.meta_key)):
            meta = getattr(src, "meta", None) or {}
            source = meta.get("filename_or_obj")
            if source:
                return image_stem(str(source))
        raise ValueError("SaveLabelMapd: no 'filename_or_obj' in the label's or the image's metadata to name the file.")

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = self._name(d, d[key])
            folder = self.output_dir / name if self.separate_folder else self.output_dir
            save_label_map(d[key], folder / f"{name}_{self.output_postfix}{self.output_ext}")
        return d

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Task-aware sliding-window inference, with optional mirroring TTA, and the all-tasks path of the softmax methods
(one encoder pass per window, one decoder pass per task, maps merged with the catalog's label offsets)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import LoadImage

from .dicom import with_series_reader
from .tasks import TaskSpec

__all__ = [
    "MirroredPredictor",
    "TaskSlidingWindowInferer",
    "MergedTasksInferer",
    "requested_tasks",
    "merge_task_labels",
    "tasks_for_image",
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


def requested_tasks(
    catalog: Any, task: str | int, modalities: Sequence[str] | None = None, images: Any = None
) -> list[TaskSpec]:
    """The tasks one inference run segments (an inference config's ``merged_tasks``): ``[catalog[task]]``, or for
    ``task="all"`` those :func:`tasks_for_image` picks for the first image of ``images``.

    ``images`` (a file, folder, list or datalist, as :func:`uniseg_components.io.list_images` takes) is listed only
    when the channel count or rank of an image decides, so a config may name a data folder that does not exist
    when it is not needed (MONAI Label parses the config without data).

    Args:
        catalog: the network's :class:`~uniseg_components.tasks.TaskCatalog`.
        task: a task name or id, or ``"all"``.
        modalities: the image's channel modalities, default ``None``.
        images: the run's images, default ``None``.

    Raises:
        KeyError: unknown task (the message lists the catalog's tasks).
        ValueError: see :func:`tasks_for_image`.
    """
    if str(task).lower() != "all":
        return [catalog[task]]

    def first_image() -> Any:
        from .io import list_images

        if images is None:
            raise ValueError("task 'all' on a catalog mixing 2D and 3D tasks needs the images to pick the rank.")
        return list_images(images)[0]["image"]

    return tasks_for_image(catalog, first_image, modalities)


def tasks_for_image(catalog: Any, image: Any, modalities: Sequence[str] | None = None) -> list[TaskSpec]:
    """The tasks ``--task all`` segments for one image: those of the catalog with the given ``modalities`` (or,
    when not given, with the only modality combination of the catalog that has the image's channel count), and,
    when these tasks mix 2D and 3D, only those of the image's rank (a ``(X, Y, 1)`` file counts as 2D for 2D tasks).

    Args:
        catalog: the network's :class:`~uniseg_components.tasks.TaskCatalog`.
        image: a file path (or anything ``LoadImage`` reads, or a function returning one); loaded (and the function
            called) only when the channel count or rank is needed.
        modalities: the image's channel modalities (e.g. ``["CT", "PET"]``), default ``None``.

    Raises:
        ValueError: no task fits, or several modality combinations fit and ``modalities`` is needed.
    """
    loaded: list[Any] = []

    def load() -> Any:
        if not loaded:
            nonlocal image
            image = image() if callable(image) else image
            loaded.append(with_series_reader(LoadImage(image_only=True, ensure_channel_first=True))(image))
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

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""How Hermes' per-target sigmoid outputs become label maps: one target map per channel, merged by the most probable
target, and every target of several datasets in one sliding-window pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ...distributed import unwrap
from ...inferers import MergedTasksInferer
from ...tasks import TaskSpec

__all__ = ["targets_to_label", "TargetsToLabeld", "HermesMergedInferer"]


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
    probable target's channel + 1), as float32 like MONAI's ``AsDiscreted`` (MONAI Label's ITK writer has no
    64-bit integer images).

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
            label = targets_to_label(torch.as_tensor(img), self.threshold, self.sigmoid).float()
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
        threshold: probability threshold, default 0.5.
        kwargs: the other :class:`~uniseg_components.inferers.MergedTasksInferer` arguments (``sw_batch_size``,
            ``overlap``, ``mode``, ``mirror_axes``...).

    Returns (when called):
        float32 merged label map ``(B, 1, *spatial)``.
    """

    def __init__(
        self, roi_size: Sequence[int] | int, tasks: Sequence[TaskSpec], threshold: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(roi_size, tasks, **kwargs)
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
        net = unwrap(network)
        ids, mod = self.request(net, inputs.device)
        logits = self._sliding(inputs, network, task_ids=ids, modality_id=mod)
        logits = logits[:, : len(self.target_ids)]
        return targets_to_label(logits, self.threshold, True, self.target_ids).float()

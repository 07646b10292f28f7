# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Losses: per-task Dice + cross-entropy with nnU-Net's deep-supervision weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss

__all__ = ["deep_supervision_weights", "TaskDiceCELoss", "HermesLoss"]


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's deep-supervision weights: ``1 / 2**i``, the lowest resolution set to 0, normalised to sum 1.

    For 5 levels this gives ``[0.533, 0.267, 0.133, 0.067, 0.0]`` (highest resolution first). One level gives
    ``[1.0]``.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}.")
    w = [0.5**i for i in range(levels)]
    if levels > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


class TaskDiceCELoss(DeepSupervisionLoss):
    """Dice + cross-entropy over one task's own classes, with deep supervision.

    The network returns logits already sliced to the current task's ``K`` classes (``UniSeg`` slices its shared
    heads), so the softmax here runs over that task's classes only. Dice is the soft *batch* Dice without the
    background (smooth 1e-5); cross-entropy covers all ``K`` classes; both are weighted 1. For a list of
    deep-supervision outputs (highest resolution first) the target is resized with nearest-exact interpolation
    and the losses are weighted by :func:`deep_supervision_weights`; levels with weight 0 are skipped.

    Args:
        batch_dice: compute Dice over the whole batch (nnU-Net's batch Dice), default ``True``.
        smooth: Dice numerator and denominator smoothing, default 1e-5.
        lambda_dice: weight of the Dice term, default 1.0.
        lambda_ce: weight of the cross-entropy term, default 1.0.

    Shapes:
        ``input``: ``(B, K, *spatial)`` logits or a list of them; ``target``: ``(B, 1, *spatial)`` integer labels
        in ``[0, K)``.

    Raises:
        ValueError: when a label value is outside ``[0, K)`` (a label of another task, or a wrong catalog).
    """

    def __init__(
        self, batch_dice: bool = True, smooth: float = 1e-5, lambda_dice: float = 1.0, lambda_ce: float = 1.0
    ) -> None:
        super().__init__(
            DiceCELoss(
                include_background=False,
                to_onehot_y=True,
                softmax=True,
                batch=batch_dice,
                smooth_nr=smooth,
                smooth_dr=smooth,
                lambda_dice=lambda_dice,
                lambda_ce=lambda_ce,
            )
        )

    def get_weights(self, levels: int = 1) -> list[float]:
        return deep_supervision_weights(levels)

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        first = input[0] if isinstance(input, (list, tuple)) else input
        k = first.shape[1]
        if target.ndim == first.ndim - 1:
            target = target.unsqueeze(1)
        lo, hi = float(target.min()), float(target.max())
        if lo < 0 or hi >= k:
            raise ValueError(
                f"label values must lie in [0, {k - 1}] for a task with {k} classes, got values in [{lo:g}, {hi:g}]; "
                "check the datalist's task names against the catalog."
            )
        if not isinstance(input, (list, tuple)):
            return self.loss(input.float(), target)
        weights = self.get_weights(len(input))
        loss = torch.zeros((), dtype=torch.float, device=target.device)
        for w, out in zip(weights, input):
            if w > 0:
                loss = loss + w * self.get_loss(out.float(), target)
        return loss


class HermesLoss(torch.nn.Module):
    """Hermes' partial-label loss: per-target BCE + soft Dice on the requested targets only, plus modality CE.

    Channel ``j`` of sample ``b`` is supervised with the binary map ``label_b == j + 1``: a dataset's targets are
    requested in class order (``Hermes.request`` / ``forward(task_id=...)`` do so), so a sample only has channels
    for its own dataset's targets and structures its dataset does not annotate are never treated as background.
    Channels whose request entry is ``-1`` (padding) get weight 0. Per (sample, channel): BCE-with-logits averaged
    over the voxels and the soft Dice loss ``1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s)`` with ``p`` the
    sigmoid; both are summed with the validity weights and divided by the number of valid pairs. The modality term
    is ``modality_weight * CE(modality logits, modality_id)``.

    Args:
        modality_weight: weight of the modality cross-entropy, default 0.01 (the paper's).
        smooth: Dice smoothing ``s``, default 1e-5.

    Shapes:
        ``pred``: the training output of ``Hermes``, ``{"pred": (B, n, *spatial) logits, "modality": (B, M),
        "task_ids": (B, n) with -1 for padding, "modality_id": (B,)}``; ``target``: ``(B, 1, *spatial)`` (or
        ``(B, *spatial)``) integer labels of each sample's own dataset.

    Raises:
        ValueError: ``pred`` lacks a key, or a label value exceeds the sample's number of valid targets.
    """

    def __init__(self, modality_weight: float = 0.01, smooth: float = 1e-5) -> None:
        super().__init__()
        self.modality_weight = float(modality_weight)
        self.smooth = float(smooth)

    def forward(self, pred: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        missing = {"pred", "task_ids"} - set(pred) if isinstance(pred, dict) else {"pred", "task_ids"}
        if missing:
            raise ValueError(
                f"HermesLoss needs Hermes' training output dict with 'pred' and 'task_ids' (missing "
                f"{sorted(missing)}); is the network in training mode?"
            )
        logits = pred["pred"].float()
        b, n = logits.shape[:2]
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        labels = target[:, 0].long()
        valid = (pred["task_ids"].to(logits.device) != -1).expand(b, n)
        counts = valid.sum(1)
        too_big = labels.reshape(b, -1).amax(1) > counts
        if bool(too_big.any()) or bool((labels < 0).any()):
            bad = {i: sorted(set(labels[i].unique().tolist())) for i in range(b) if bool(too_big[i])}
            raise ValueError(
                f"label values must lie in [0, number of requested targets] per sample; samples {sorted(bad)} have "
                f"values {list(bad.values())} for {[int(counts[i]) for i in bad]} target(s) (or a label is negative); "
                "check the datalist's task names against the catalog."
            )
        classes = torch.arange(1, n + 1, device=labels.device).reshape(1, n, *([1] * (labels.ndim - 1)))
        gt = (labels.unsqueeze(1) == classes).float()  # (B, n, *spatial)
        w = valid.float()
        denom = w.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none").flatten(2).mean(2)
        prob = torch.sigmoid(logits).flatten(2)
        g = gt.flatten(2)
        dice = 1 - (2 * (prob * g).sum(2) + self.smooth) / (prob.sum(2) + g.sum(2) + self.smooth)
        loss = ((bce + dice) * w).sum() / denom
        if self.modality_weight and "modality" in pred and "modality_id" in pred:
            mod = pred["modality_id"].to(logits.device).reshape(-1).expand(b)
            loss = loss + self.modality_weight * F.cross_entropy(pred["modality"].float(), mod)
        return loss

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes' partial-label loss: masked per-target BCE + soft Dice, plus the auxiliary modality classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["HermesLoss"]


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

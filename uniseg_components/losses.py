# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The softmax methods' loss (UniSeg, MedUniSeg, the fine-tuned model): per-task Dice + cross-entropy with nnU-Net's
deep-supervision weights. Hermes' partial-label sigmoid loss is in its unit (``methods.hermes.loss``)."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

__all__ = ["deep_supervision_weights", "TaskDiceCELoss"]


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

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes' partial-label loss: masked per-target BCE + adaptive Tversky-like (or plain soft) Dice, plus the
auxiliary modality classification."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["HermesLoss"]


class HermesLoss(torch.nn.Module):
    """Hermes' partial-label loss: per-target BCE + Dice on the requested targets only, plus modality CE.

    Channel ``j`` of sample ``b`` is supervised with the binary map ``label_b == j + 1``: a dataset's targets are
    requested in class order (``Hermes.request`` / ``forward(task_id=...)`` do so), so a sample only has channels
    for its own dataset's targets and structures its dataset does not annotate are never treated as background.
    Channels whose request entry is ``-1`` (padding) get weight 0: they add nothing to the loss or its gradient.
    Per (sample, channel), with ``p`` the sigmoid and ``g`` the binary target summed over the voxels as
    ``TP = sum(p g)``, ``FP = sum(p (1 - g))``, ``FN = sum((1 - p) g)``:

    * BCE-with-logits averaged over the voxels;
    * ``adaptive_tversky=True`` (Hermes' ``BinaryDiceLoss``, the default): the Tversky-like loss
      ``1 - (2 TP + s) / (2 TP + 2 alpha FP + 2 beta FN + s)`` with ``alpha = clamp(FP / (FP + FN), *alpha_range)``
      and ``beta = 1 - alpha``, computed per sample and channel from the soft prediction: false positives weigh more
      where they dominate the errors, false negatives where those do. Up to the smoothing this is the Tversky index
      ``TP / (TP + alpha FP + beta FN)``; at ``alpha = beta = 1/2`` it is exactly the soft Dice below. (The
      authors' code divides ``TP`` by ``TP + alpha FP + beta FN + 1e-6``, so a channel whose target is empty costs
      1 whatever the prediction; here, as in the plain Dice, it costs ``1 - s / (2 alpha FP + s)``, 0 for an empty
      prediction.)
    * ``adaptive_tversky=False``: the soft Dice loss ``1 - (2 TP + s) / (sum(p) + sum(g) + s)``.

    Both terms are summed with the validity weights and divided by the number of valid pairs. The modality term is
    ``modality_weight * CE(modality logits, modality_id)``.

    The gradient through ``alpha``: by default ``alpha`` is detached, a per-(sample, channel) weighting of the two
    error kinds, as adaptive loss weights usually are. The authors' code does not detach it; inside the clamp range
    the gradient through ``alpha`` then rewards false positives where false negatives dominate: with ``alpha FP +
    beta FN = (FP^2 + FN^2) / (FP + FN)``, the derivative by ``FP`` is ``(FP^2 + 2 FP FN - FN^2) / (FP + FN)^2``,
    negative when ``FN > (1 + sqrt(2)) FP`` (-0.28 at ``alpha = 0.2``), whereas with ``alpha`` held fixed it is
    ``alpha`` > 0. The loss value is the same either way; ``detach_alpha=False`` gives the authors' gradient.
    Outside the clamp range both are the same (the clamp has no gradient).

    Args:
        modality_weight: weight of the modality cross-entropy, default 0.01 (the paper's).
        smooth: Dice smoothing ``s``, default 1e-5.
        adaptive_tversky: the adaptive Tversky-like Dice (Hermes'), default ``True``; ``False``: plain soft Dice.
        alpha_range: the clamp of ``alpha``, default (0.2, 0.8) (Hermes').
        detach_alpha: no gradient through ``alpha``, default ``True`` (see above).

    Shapes:
        ``pred``: the training output of ``Hermes``, ``{"pred": (B, n, *spatial) logits, "modality": (B, M),
        "task_ids": (B, n) with -1 for padding, "modality_id": (B,)}``; ``target``: ``(B, 1, *spatial)`` (or
        ``(B, *spatial)``) integer labels of each sample's own dataset.

    Raises:
        ValueError: ``pred`` lacks a key, a label value exceeds the sample's number of valid targets,
            ``alpha_range`` is not ``0 <= low <= high <= 1``, or a flag is not a bool.
    """

    def __init__(
        self,
        modality_weight: float = 0.01,
        smooth: float = 1e-5,
        adaptive_tversky: bool = True,
        alpha_range: Sequence[float] = (0.2, 0.8),
        detach_alpha: bool = True,
    ) -> None:
        super().__init__()
        for name, flag in (("adaptive_tversky", adaptive_tversky), ("detach_alpha", detach_alpha)):
            if not isinstance(flag, bool):  # e.g. the string "false" of `--adaptive_tversky false`, which is truthy
                raise ValueError(f"{name} must be True or False, got {flag!r} (on the command line: True / False).")
        low, high = (float(a) for a in alpha_range)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= low <= high <= 1, got {tuple(alpha_range)}.")
        self.modality_weight = float(modality_weight)
        self.smooth = float(smooth)
        self.adaptive_tversky = bool(adaptive_tversky)
        self.alpha_range = (low, high)
        self.detach_alpha = bool(detach_alpha)

    def tversky_alpha(self, prob: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """``alpha = clamp(FP / (FP + FN), *alpha_range)`` per sample and channel of ``(B, n, *spatial)``
        probabilities and binary targets: ``(B, n)`` (``alpha_range[0]`` where ``FP + FN`` is 0)."""
        p, g = prob.flatten(2), gt.flatten(2)
        fp = (p * (1 - g)).sum(2)
        fn = ((1 - p) * g).sum(2)
        alpha = fp / (fp + fn).clamp(min=1e-12)
        alpha = alpha.clamp(*self.alpha_range)
        return alpha.detach() if self.detach_alpha else alpha

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
        tp = (prob * g).sum(2)
        if self.adaptive_tversky:
            fp = (prob * (1 - g)).sum(2)
            fn = ((1 - prob) * g).sum(2)
            alpha = self.tversky_alpha(prob, g)
            dice = 1 - (2 * tp + self.smooth) / (2 * tp + 2 * alpha * fp + 2 * (1 - alpha) * fn + self.smooth)
        else:
            dice = 1 - (2 * tp + self.smooth) / (prob.sum(2) + g.sum(2) + self.smooth)
        loss = ((bce + dice) * w).sum() / denom
        if self.modality_weight and "modality" in pred and "modality_id" in pred:
            mod = pred["modality_id"].to(logits.device).reshape(-1).expand(b)
            loss = loss + self.modality_weight * F.cross_entropy(pred["modality"].float(), mod)
        return loss

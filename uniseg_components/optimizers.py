# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Optimisers and learning-rate schedules the bundle configs name: :func:`create_optimizer` (AdamW, or LAMB set up
as apex's ``FusedLAMB``) and :class:`WarmupPolyLR` (exponential warm-up, then poly decay, stepped per epoch).

LAMB comes from the pure-Python package ``pytorch_optimizer`` (imported when a LAMB optimiser is built, so that
nothing else needs it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["OPTIMIZERS", "create_optimizer", "lamb", "WarmupPolyLR"]

logger = logging.getLogger(__name__)

#: the optimiser names :func:`create_optimizer` knows
OPTIMIZERS = ("lamb", "adamw")


def lamb(
    params: Iterable[Any],
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> torch.optim.Optimizer:
    """LAMB (You et al., ICLR 2020) as apex's ``FusedLAMB`` computes it with its defaults (``bias_correction=True``,
    ``adam_w_mode=True``, ``grad_averaging=True``, ``max_grad_norm=1.0``, ``use_nvlamb=False``), built from
    ``pytorch_optimizer.Lamb`` (4.1.0). The arguments' defaults are ``FusedLAMB``'s; Hermes' authors pass lr 2e-3,
    betas (0.9, 0.999), eps 1e-5 and weight decay 1e-5.

    ``FusedLAMB`` per step: the gradients are divided by ``max(1, global_norm / max_grad_norm)`` (global norm over
    every parameter of every group); ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``; the update is
    ``u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p``; and
    ``p -= lr * (||p|| / ||u||) * u`` per tensor (ratio 1 when either norm is 0, or when the weight decay is 0).

    ``pytorch_optimizer.Lamb`` arguments chosen, from its code:

    * ``pre_norm=True, max_grad_norm`` (1.0): the gradients are multiplied by
      ``min(1, max_grad_norm / (global_norm + eps))``, apex's global-norm clipping (up to ``eps``);
    * ``weight_decouple=False``: adds ``weight_decay * p`` to the Adam update before the trust ratio and keeps it out
      of the moments, which is what apex's ``adam_w_mode=True`` does. (``weight_decouple=True``, the package's
      default, would instead shrink ``p *= 1 - lr * weight_decay`` outside the trust ratio, AdamW style.)
    * ``grad_averaging=True`` (``1 - b1`` on the new gradient), ``adam=False`` (the trust ratio is used),
      ``rectify=False``;
    * ``adam_debias=True``: the package corrects no bias of the second moment, and by default divides the step by
      ``1 - b1^t`` *after* the trust ratio, which makes early steps up to 10 times apex's. Under the trust ratio
      apex's bias corrections are per-tensor scalars that cancel, so apex moves each tensor by ``lr * ||p||``;
      ``adam_debias=True`` does the same.
    * the package clamps ``||p||`` at 10 in the trust ratio (class attribute ``clamp``); apex does not, so it is
      set to infinity on the returned optimiser.

    What remains different from apex: (1) ``eps`` is added to ``sqrt(v)`` rather than to ``sqrt(v / (1 - b2^t))``,
    i.e. it acts ``1 / sqrt(1 - b2^t)`` times larger in apex's terms (about 32x at step 1, 1.26x at step 1000, 1x
    after a few thousand steps), which only matters where ``sqrt(v)`` is near ``eps``; (2) for a tensor whose norm is
    0 (fresh biases, zero-initialised projections: trust ratio 1) a step is ``(1 - b1^t) / sqrt(1 - b2^t)`` times
    apex's (3.2x at step 1); (3) the weight-decay term is weighted relative to the Adam part by the same factor's
    inverse; (4) ``eps`` is added to the update norm in the trust ratio; (5) the trust ratio is used even when the
    weight decay is 0 (apex: ratio 1 then, unless ``use_nvlamb``). ``tests/test_hermes.py`` compares it with a
    re-implementation of apex's kernel.

    Args:
        params: parameters or parameter groups (dicts with ``"params"`` and e.g. ``"lr"``).
        lr: learning rate, default 1e-3.
        betas: ``(b1, b2)``, default (0.9, 0.999).
        eps: default 1e-6.
        weight_decay: default 0.01.
        max_grad_norm: global gradient norm above which all gradients are scaled down to it, default 1.0; 0 turns it
            off.

    Raises:
        ImportError: ``pytorch_optimizer`` is not installed (``pip install pytorch_optimizer``).
        ValueError: negative ``weight_decay``, ``eps`` or ``max_grad_norm``.
    """
    try:
        from pytorch_optimizer import Lamb
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("LAMB needs the package pytorch_optimizer: pip install pytorch_optimizer") from e
    for name, value in (("weight_decay", weight_decay), ("eps", eps), ("max_grad_norm", max_grad_norm)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    opt = Lamb(
        params,
        lr=float(lr),
        betas=tuple(float(b) for b in betas),
        eps=float(eps),
        weight_decay=float(weight_decay),
        weight_decouple=False,
        grad_averaging=True,
        rectify=False,
        adam=False,
        pre_norm=max_grad_norm > 0,
        max_grad_norm=float(max_grad_norm),
        adam_debias=True,
    )
    opt.clamp = math.inf  # apex uses ||p|| as it is in the trust ratio
    return opt


def create_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimiser a bundle config names by ``optimizer_name``.

    * ``"lamb"``: :func:`lamb` (apex ``FusedLAMB`` semantics, global gradient-norm clipping at 1.0 inside);
    * ``"adamw"``: ``torch.optim.AdamW``.

    Args:
        name: ``"lamb"`` or ``"adamw"`` (case-insensitive).
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: default 0.
        betas: default (0.9, 0.999).
        eps: default 1e-8 (AdamW's; Hermes' authors use 1e-5 with LAMB).

    Raises:
        ValueError: an unknown name.
    """
    key = str(name).lower()
    if key == "lamb":
        return lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer_name {name!r}; choose one of {list(OPTIMIZERS)}.")


class WarmupPolyLR(LRScheduler):
    """Exponential warm-up, then poly decay: Hermes' schedule (``exp_lr_scheduler_with_warmup`` of its code), stepped
    once per epoch (MONAI's ``LrScheduleHandler``).

    With ``e`` the number of completed epochs (``last_epoch``; 0 during the first epoch), ``W = warmup_epochs`` and
    ``T = total_iters``, each parameter group's learning rate is ``base_lr * f(e)`` with::

        f(e) = exp(10 * (e / W - 1))            for e <= W   (exp(-10) ~ 4.5e-5 in epoch 0, ..., 1 at e = W)
        f(e) = max(0, 1 - e / T) ** power       for e > W

    For ``W = 5``: e^-10, e^-8, e^-6, e^-4, e^-2 (0.135) in the first five epochs, 1 in the sixth, then the poly
    value of the epoch, ``(1 - e / T) ** 0.9``: the decay is not restarted after the warm-up, so it ends at 0 at
    ``T`` whatever ``W``. The authors' code writes ``2.718 ** (...)`` for ``exp(...)`` (0.07% lower in epoch 0). With
    ``W = 0`` this is ``torch.optim.lr_scheduler.PolynomialLR(total_iters=T, power=power)``.

    Why not torch's own: ``SequentialLR`` of a warm-up and ``PolynomialLR`` restarts the poly count at the milestone
    (``(1 - (e - W) / (T - W)) ** power``), and a ``LambdaLR`` lambda is neither saved with the state nor shows the
    schedule's length; here ``total_iters``, ``warmup_epochs`` and ``power`` are part of ``state_dict``, and
    :class:`~uniseg_components.handlers.CheckpointLoader` refuses to resume past ``total_iters``, as for
    ``PolynomialLR``.

    Args:
        optimizer: the optimiser (every parameter group scales its own initial learning rate).
        total_iters: ``T``, the epochs of the run (``max_epochs``), >= 1.
        warmup_epochs: ``W``, default 5; 0 for no warm-up. A run no longer than ``W`` epochs trains at warm-up rates
            only (logged as a warning).
        power: default 0.9.
        last_epoch: as torch's schedulers, default -1 (a new run).

    Raises:
        ValueError: ``total_iters`` < 1, negative ``warmup_epochs`` or ``power``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        warmup_epochs: int = 5,
        power: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if int(total_iters) < 1:
            raise ValueError(f"total_iters (epochs) must be >= 1, got {total_iters}.")
        if int(warmup_epochs) < 0 or int(warmup_epochs) != warmup_epochs:
            raise ValueError(f"warmup_epochs must be a whole number >= 0, got {warmup_epochs}.")
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}.")
        self.total_iters = int(total_iters)
        self.warmup_epochs = int(warmup_epochs)
        self.power = float(power)
        if 0 < self.total_iters <= self.warmup_epochs:
            logger.warning(
                "a run of %d epoch(s) with a %d-epoch warm-up trains at warm-up learning rates only (at most %.3g "
                "times the base); set warmup_epochs below the epochs",
                self.total_iters,
                self.warmup_epochs,
                self.factor(self.total_iters - 1),
            )
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """``f(epoch)``: the multiple of the base learning rate after ``epoch`` completed epochs."""
        if epoch <= self.warmup_epochs and self.warmup_epochs > 0:
            return math.exp(10.0 * (epoch / self.warmup_epochs - 1.0))
        return max(0.0, 1.0 - epoch / self.total_iters) ** self.power

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

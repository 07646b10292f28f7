# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""An exponential moving average of the network's weights, updated after every optimiser step."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..distributed import unwrap

__all__ = ["EMAHandler"]

logger = logging.getLogger(__name__)


def _ramped_ema_multi_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """``multi_avg_fn`` of ``AveragedModel``: ``ema <- a ema + (1 - a) p`` with ``a = min(decay, n / (n + 1))``,
    ``n`` the updates done before this one (Hermes' ``update_ema_variables``)."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, n / (n + 1.0))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, weight)
        else:
            for e, c in zip(ema, current):
                e.copy_(e * (1.0 - weight) + c * weight)

    return update


class EMAHandler:
    """Keep an exponential moving average (EMA) of a network's parameters, updated after every optimiser step, as
    Hermes does (its EMA weights are the ones validated and saved).

    A ``torch.optim.swa_utils.AveragedModel`` of the unwrapped network (a ``DistributedDataParallel`` wrapper is
    taken off; under DDP every rank averages the same synchronised weights) holds the average: the first update
    copies the parameters, update ``k`` (``k`` = 1, 2, ...) sets ``ema = a_k ema + (1 - a_k) p`` with
    ``a_k = min(decay, k / (k + 1))`` when ``ramp_up`` (Hermes' code: a running mean for the first
    ``1 / (1 - decay) - 1`` updates, then the EMA), else ``a_k = decay`` (``get_ema_multi_avg_fn``). Buffers are
    copied from the network at every update, not averaged.

    It updates at ``IterationEvents.MODEL_COMPLETED`` of a MONAI ``SupervisedTrainer`` (after ``optimizer.step()``;
    with gradient accumulation only on the iterations that step). In a bundle config:

    * :attr:`network` is the module to validate and to save under ``"model"`` in the best and final checkpoints
      (the EMA copy, or the live unwrapped network when EMA is off);
    * the handler itself goes into the resume checkpoint (``"latest"`` saver's ``save_dict`` and the resume
      ``load_dict``), so that a resumed run continues the average: :meth:`state_dict` is ``{"decay",
      "num_updates", "weights"}``.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        decay: the EMA decay, default 0.99 (Hermes' alpha); 0 or ``None`` turns EMA off: :attr:`network` is then
            the live network, nothing is updated and the state is empty.
        ramp_up: ``a_k = min(decay, k / (k + 1))``, default ``True`` (Hermes' code); ``False``: ``a_k = decay``.

    Raises:
        ValueError: ``decay`` outside [0, 1).
    """

    def __init__(self, network: nn.Module, decay: float | None = 0.99, ramp_up: bool = True) -> None:
        decay = 0.0 if decay is None else float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1) (0 or None: no EMA), got {decay}.")
        self.source = network
        self.decay = decay
        self.ramp_up = bool(ramp_up)
        self.averaged: AveragedModel | None = None
        if decay > 0:
            avg_fn = _ramped_ema_multi_avg_fn(decay) if self.ramp_up else get_ema_multi_avg_fn(decay)
            self.averaged = AveragedModel(unwrap(network), multi_avg_fn=avg_fn, use_buffers=False)
            self.averaged.module.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self.averaged is not None

    @property
    def network(self) -> nn.Module:
        """The network to evaluate and save: the EMA copy, or the live (unwrapped) network without EMA."""
        return self.averaged.module if self.averaged is not None else unwrap(self.source)

    @property
    def num_updates(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def attach(self, engine: Any) -> None:
        if self.enabled:
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Any = None) -> None:
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        if acc > 1:  # MONAI's trainer steps on every acc-th iteration of an epoch and on its last one
            length = engine.state.epoch_length
            local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
            if (local + 1) % acc != 0 and (length is None or local + 1 != length):
                return
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Average the network's current parameters in (and copy its buffers)."""
        if self.averaged is not None:
            self.averaged.update_parameters(unwrap(self.source))

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "num_updates", "weights"}`` (the EMA network's state dict); ``{}`` without EMA."""
        if self.averaged is None:
            return {}
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.averaged.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the average (a resumed run). A state without weights (the run was trained without EMA) starts
        the average afresh from the network at the next update."""
        if self.averaged is None:
            return
        if not state or "weights" not in state:
            logger.warning("the checkpoint holds no EMA weights: the EMA starts afresh from the current network")
            self.averaged.n_averaged.zero_()
            return
        if float(state.get("decay", self.decay)) != self.decay:
            logger.warning("resuming an EMA of decay %s with decay %s", state["decay"], self.decay)
        self.averaged.module.load_state_dict(state["weights"])
        self.averaged.n_averaged.fill_(int(state["num_updates"]))

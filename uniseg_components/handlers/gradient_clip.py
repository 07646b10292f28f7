# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Gradient-norm clipping between backward and optimiser step."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipHandler"]


class GradientClipHandler:
    """Clip the gradient norm between backward and optimiser step (UniSeg clips at 12).

    Attaches to ``IterationEvents.BACKWARD_COMPLETED`` of a MONAI ``SupervisedTrainer``; with AMP the gradients
    are unscaled first (the scaler's ``step`` then skips a second unscale).

    Args:
        max_norm: the largest allowed total gradient norm, default 12.
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.max_norm = float(max_norm)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Per-epoch seeding, so that a resumed run draws what an uninterrupted one draws."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data.utils import set_rnd

from ..distributed import get_rank

__all__ = ["epoch_seed", "EpochSeedHandler"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed drawn from ``(seed, epoch, rank)``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0] & 0x7FFFFFFF)


class EpochSeedHandler:
    """At every ``EPOCH_STARTED``: ``sampler.set_epoch(epoch)`` and reseed the random transforms and torch.

    The seed is :func:`epoch_seed` of ``(seed, epoch, rank)``; torch's generator is reseeded too, so the
    DataLoader's worker seeds follow. An epoch therefore draws the same batches and augmentations whether the
    run started at epoch 1 or resumed from a checkpoint (with the same number of workers).

    Args:
        sampler: an object with ``set_epoch(int)`` (the batch sampler), default ``None``.
        dataset: the training dataset whose transforms to reseed, default ``None``.
        seed: default 0.
    """

    def __init__(self, sampler: Any = None, dataset: Any = None, seed: int = 0) -> None:
        self.sampler, self.dataset, self.seed = sampler, dataset, int(seed)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        s = epoch_seed(self.seed, epoch, get_rank())
        torch.manual_seed(s)
        if self.dataset is not None:
            set_rnd(self.dataset, s)

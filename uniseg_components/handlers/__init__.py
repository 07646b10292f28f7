# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the training and evaluation engines, one per module (as ``monai.handlers``)."""

from __future__ import annotations

from .batch_recorder import BatchRecorder
from .checkpoint_loader import CheckpointLoader, resume_path
from .checkpoint_saver import SafeCheckpointSaver
from .dice_table import DiceTableHandler
from .ema import EMAHandler
from .epoch_seed import EpochSeedHandler, epoch_seed
from .gradient_clip import GradientClipHandler

__all__ = [
    "BatchRecorder",
    "CheckpointLoader",
    "resume_path",
    "SafeCheckpointSaver",
    "DiceTableHandler",
    "EMAHandler",
    "EpochSeedHandler",
    "epoch_seed",
    "GradientClipHandler",
]

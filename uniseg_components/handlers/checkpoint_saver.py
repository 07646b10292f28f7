# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The one checkpoint writer of a training run: atomic, checksummed, in three modes (latest, best, final)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Events

from ..checkpoints import with_checksum
from ..distributed import is_main_process, unwrap
from ..io import save_torch

__all__ = ["SafeCheckpointSaver"]

logger = logging.getLogger(__name__)

_MODES = {"latest": "checkpoint_latest.pt", "best": "model.pt", "final": "model_final.pt"}


def _state_of(obj: Any) -> Any:
    obj = unwrap(obj) if hasattr(obj, "module") else obj
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


class SafeCheckpointSaver:
    """Write ``{name: obj.state_dict() for name, obj in save_dict}`` (plus a checksum) atomically.

    Only the main process writes (every rank may hold the handler: a ``"best"`` saver tracks the same all-reduced
    metric on every rank). Every file goes through :func:`uniseg_components.io.atomic_path`, so a run killed during a
    save leaves the previous complete file, never a truncated one, and carries the checksum that
    :func:`uniseg_components.checkpoints.read_checkpoint` verifies. Networks wrapped in ``DistributedDataParallel``
    are saved without the ``module.`` prefix. Everything stored must load with ``torch.load(...,
    weights_only=True)`` (state dicts of modules, optimisers, schedulers, Ignite engines,
    :class:`~uniseg_components.checkpoints.CheckpointMeta`, this saver).

    Modes:

    * ``"latest"`` (attach to the trainer): the full training state every ``interval`` epochs, with the engine itself
      under ``engine_key`` (epoch, iteration), default file ``checkpoint_latest.pt``: what ``--resume`` loads.
    * ``"best"`` (attach to the evaluator): when ``engine.state.metrics[metric_name]`` is higher than every earlier
      value (the first value always counts), default file ``model.pt``. The best value and its epoch are this
      saver's state (``state_dict``): put the saver into the ``"latest"`` saver's ``save_dict`` and a resumed run
      replaces ``model.pt`` only when validation beats the best of the whole run.
    * ``"final"`` (attach to the trainer): when the run completes, default file ``model_final.pt``.

    Args:
        save_dir: folder, created when missing.
        save_dict: ``{"model": net, "meta": CheckpointMeta(...), "optimizer": opt, ...}``.
        mode: ``"latest"`` (default), ``"best"`` or ``"final"``.
        filename: default by mode (see above).
        interval: epochs between ``"latest"`` writes, default 1.
        metric_name: the metric a ``"best"`` saver compares, default ``"val_mean_dice"``.
        engine_key: ``"latest"`` only: key under which the engine it is attached to is saved, default ``"trainer"``
            (a config cannot name the trainer inside its own handler list); ``None`` skips it.

    Raises:
        ValueError: unknown mode, empty ``save_dict``, ``interval`` < 1.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        mode: str = "latest",
        filename: str | None = None,
        interval: int = 1,
        metric_name: str = "val_mean_dice",
        engine_key: str | None = "trainer",
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}.")
        if not save_dict:
            raise ValueError("SafeCheckpointSaver needs a non-empty save_dict.")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.mode = mode
        self.path = Path(save_dir) / (filename or _MODES[mode])
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.metric_name = metric_name
        self.engine_key = engine_key if mode == "latest" else None
        self.best_metric = -math.inf
        self.best_epoch = 0

    def attach(self, engine: Any) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        event = {
            "latest": Events.EPOCH_COMPLETED(every=self.interval),
            "best": Events.COMPLETED,
            "final": Events.COMPLETED,
        }[self.mode]
        engine.add_event_handler(event, self)

    def __call__(self, engine: Any = None) -> Path | None:
        """Write the checkpoint (a ``"best"`` saver only when the engine's metric improved); returns the path
        written, or ``None``."""
        if self.mode == "best":
            if engine is None or self.metric_name not in engine.state.metrics:
                return None
            value = float(engine.state.metrics[self.metric_name])
            if not value > self.best_metric:
                logger.info(
                    "%s %.4f does not beat the best %.4f (epoch %d); %s kept",
                    self.metric_name,
                    value,
                    self.best_metric,
                    self.best_epoch,
                    self.path,
                )
                return None
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
        return self.save()

    def save(self) -> Path | None:
        """Write the checkpoint now (on the main process only; other ranks return ``None``)."""
        if not is_main_process():
            return None
        obj = {k: _state_of(v) for k, v in self.save_dict.items() if v is not self}
        save_torch(with_checksum(obj), self.path)
        logger.info("saved %s checkpoint %s", self.mode, self.path)
        return self.path

    def state_dict(self) -> dict[str, Any]:
        """``{"best_metric", "best_epoch"}`` of a ``"best"`` saver (what a resumed run must not forget)."""
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric = float(state.get("best_metric", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))

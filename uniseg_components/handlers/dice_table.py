# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The per-task, per-class Dice table after every evaluation, logged and written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ignite.engine import Events

from ..io import write_json, write_text
from ..metrics import format_dice_table, mean_over_classes, task_means

__all__ = ["DiceTableHandler"]

logger = logging.getLogger(__name__)


class DiceTableHandler:
    """After each evaluation, log the per-task, per-class Dice table and write it to ``output_dir``.

    Reads ``engine.state.metric_details[metric_name]`` (written by :class:`~uniseg_components.metrics.TaskDice`).

    Args:
        output_dir: where ``<prefix>.json`` (``{"mean", "mean_over_classes", "per_task"}``) and ``<prefix>.txt`` go,
            default ``None`` (only logged).
        metric_name: default ``"val_mean_dice"``.
        prefix: file name stem, default ``"dice_per_task"``.
        print_table: print the table to stdout instead of logging it, default ``False``.
        tensorboard_dir: also write each task's mean Dice over its classes as the TensorBoard scalar
            ``<metric_name>/<task>`` (the per-task Dice curves; step: ``engine.state.epoch``, the trainer's epoch
            under a ``ValidationHandler``), default ``None`` (none written).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        metric_name: str = "val_mean_dice",
        prefix: str = "dice_per_task",
        print_table: bool = False,
        tensorboard_dir: str | os.PathLike | None = None,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.metric_name, self.prefix, self.print_table = metric_name, prefix, bool(print_table)
        self.tensorboard_dir = None if tensorboard_dir is None else str(tensorboard_dir)
        self._writer: Any = None

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        details = (getattr(engine.state, "metric_details", None) or {}).get(self.metric_name, {})
        table = format_dice_table(details)
        if self.print_table:  # printed instead of logged: the bundle's logging also goes to stdout
            print(table, flush=True)
        else:
            logger.info("validation\n%s", table)
        if self.output_dir is not None:
            mean = engine.state.metrics.get(self.metric_name)
            summary = {
                "mean": None if mean is None else float(mean),
                "mean_over_classes": mean_over_classes(details),
                "per_task": details,
            }
            write_json(self.output_dir / f"{self.prefix}.json", summary)
            write_text(self.output_dir / f"{self.prefix}.txt", table + "\n")
        if self.tensorboard_dir is not None and details:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.tensorboard_dir)
            for task, mean in task_means(details).items():
                self._writer.add_scalar(f"{self.metric_name}/{task}", mean, engine.state.epoch)
            self._writer.flush()

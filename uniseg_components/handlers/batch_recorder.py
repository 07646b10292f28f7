# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Which items each rank trained on (checks of the distributed set-up)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Events

from ..distributed import get_rank

__all__ = ["BatchRecorder"]


class BatchRecorder:
    """Append the source files and task of every training batch to ``<output_dir>/batches_rank<r>.jsonl``.

    For checks of the distributed set-up (which rank saw which batches); not needed for training. The file is a
    log, appended line by line.

    Args:
        output_dir: folder for the files.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, (list, tuple)) else [batch]  # decollated (a list of items) or not
        files: list[str] = []
        tasks: list[Any] = []
        for item in items:
            if not isinstance(item, Mapping):
                continue
            names = (getattr(item.get("image"), "meta", None) or {}).get("filename_or_obj", [])
            files += [str(f) for f in (names if isinstance(names, (list, tuple)) else [names])]
            t = item.get("task", [])
            tasks += list(t) if isinstance(t, (list, tuple)) else [t]
        out = engine.state.output
        out = out[0] if isinstance(out, (list, tuple)) and out else out
        loss = out.get("loss") if isinstance(out, Mapping) else None
        rec = {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "files": files,
            "tasks": [str(t) for t in tasks],
            "loss": None if loss is None else float(loss),
            "lr": float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else None,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"batches_rank{get_rank()}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

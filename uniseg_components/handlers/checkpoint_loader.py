# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The one checkpoint loader of the engines: model weights for evaluation and inference, the full state to resume."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint

from ..checkpoints import read_checkpoint

__all__ = ["CheckpointLoader", "resume_path"]

logger = logging.getLogger(__name__)


class CheckpointLoader:
    """Load a checkpoint (:func:`uniseg_components.checkpoints.read_checkpoint`: checksum verified) into objects
    when the engine it is attached to starts, or when called.

    ``load_dict`` names what to restore, ``{"model": net}`` for evaluation and inference, ``{"model": net,
    "optimizer": opt, "lr_scheduler": sched, "best_checkpoint": best_saver}`` to resume; with ``engine_key`` the
    engine it is attached to is restored too (epoch, iteration), so a resumed trainer continues at the next epoch
    with the ``max_epochs`` it was built with. A file holding only a plain state dict loads into a single-entry
    ``load_dict``. ``DistributedDataParallel`` wrappers are handled.

    Args:
        load_path: the checkpoint file.
        load_dict: name -> object with ``load_state_dict``.
        engine_key: key of the attached engine's state in the checkpoint, default ``None`` (not restored);
            ``"trainer"`` to resume.
        map_location: device of the loaded tensors, default ``"cpu"``.
        strict: fail on missing or unexpected model keys, default ``True``.

    Raises (when it runs):
        FileNotFoundError, ValueError: the file is missing, unreadable or damaged (naming it); the checkpoint lacks
            an entry of ``load_dict``; its epoch count is beyond the engine's ``max_epochs``; a restored epoch-level
            learning-rate schedule (``total_iters``) ends before the engine's ``max_epochs`` (the extra epochs would
            train at learning rate 0).
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        engine_key: str | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
    ) -> None:
        if not load_dict:
            raise ValueError("CheckpointLoader needs a non-empty load_dict.")
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.engine_key = engine_key
        self.map_location = map_location
        self.strict = bool(strict)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        state = read_checkpoint(self.load_path, self.map_location)
        to_load = dict(self.load_dict)
        if self.engine_key and engine is not None:
            to_load[self.engine_key] = engine
        missing = [k for k in to_load if k not in state]
        if missing and not (len(to_load) == 1 and "model" not in state):
            raise ValueError(
                f"checkpoint {str(self.load_path)!r} has no {missing} entr{'y' if len(missing) == 1 else 'ies'} "
                f"(it holds {sorted(state)}); "
                + ("resume from the latest training state (checkpoint_latest.pt)." if self.engine_key else "")
            )
        max_epochs = getattr(getattr(engine, "state", None), "max_epochs", None)
        Checkpoint.load_objects(to_load=to_load, checkpoint=state, strict=self.strict)
        if self.engine_key and engine is not None and max_epochs is not None:
            if engine.state.epoch > max_epochs:
                raise ValueError(
                    f"checkpoint {str(self.load_path)!r} is at epoch {engine.state.epoch}, beyond --epochs "
                    f"{max_epochs}; give --epochs larger than {engine.state.epoch} to train further."
                )
            for name, obj in self.load_dict.items():
                ends = getattr(obj, "total_iters", None)  # PolynomialLR, LinearLR...: an epoch-level schedule's length
                if isinstance(ends, int) and ends < max_epochs:
                    raise ValueError(
                        f"checkpoint {str(self.load_path)!r}: its learning-rate schedule ({name}, "
                        f"{type(obj).__name__}) ends at epoch {ends}, but this run goes to epoch {max_epochs}: the "
                        f"extra epochs would train at the schedule's final learning rate (0 for a poly decay). Resume "
                        f"with --epochs {ends}, or start a new run (e.g. fine-tune from models/model.pt)."
                    )
            engine.state.max_epochs = max_epochs
        logger.info("restored %s from %s", sorted(to_load), self.load_path)


def resume_path(ckpt_dir: str | os.PathLike, resume: bool | str = True, filename: str = "checkpoint_latest.pt") -> str:
    """The checkpoint a ``--resume`` run loads: ``resume`` itself when it is a path, else ``ckpt_dir/filename``.

    With ``resume`` false the default path is returned unchecked (the loader is then disabled).

    Raises:
        FileNotFoundError: resuming was asked for and the checkpoint does not exist.
    """
    explicit = isinstance(resume, (str, os.PathLike)) and str(resume).lower() not in ("true", "false", "")
    path = Path(resume) if explicit else Path(ckpt_dir) / filename
    if resume and str(resume).lower() != "false" and not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} does not exist (train once without --resume).")
    return str(path)

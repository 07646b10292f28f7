# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""How a batch carries its task into the network, the loss and the metrics, with MONAI's Ignite engines.

The datalist item's ``task`` becomes ``task_id`` (``transforms.AttachTaskd``); the task-balanced sampler makes
every batch single-task; :class:`PrepareTaskBatch` hands the id to the network as the ``task_id`` keyword (MONAI's
``SupervisedTrainer`` and ``SupervisedEvaluator`` pass extra keyword arguments through the inferer to the network);
the network returns logits sliced to the task's classes, so the loss needs no task id; :class:`TaskEvaluator`
puts ``task_id`` into the engine output so that per-task metrics can group results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import DiskSaver
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from monai.utils import CommonKeys as Keys

from .tasks import TaskCatalog

__all__ = [
    "PrepareTaskBatch",
    "TaskEvaluator",
    "GradientClipHandler",
    "SafeCheckpointSaver",
    "CheckpointMeta",
    "save_checkpoint",
    "load_checkpoint",
    "build_network",
]

logger = logging.getLogger(__name__)


def _single_task_id(task_id: Any) -> int:
    t = torch.as_tensor(task_id).reshape(-1)
    if t.numel() == 0:
        raise ValueError("the batch has an empty 'task_id'.")
    if bool((t != t[0]).any()):
        raise ValueError(
            f"a batch mixes tasks {sorted(set(t.tolist()))}; UniSeg needs single-task batches "
            "(use data.TaskBalancedBatchSampler for training and batch size 1 for validation)."
        )
    return int(t[0])


class PrepareTaskBatch:
    """``prepare_batch`` for MONAI engines: image, label and the batch's task id as the ``task_id`` keyword.

    Args:
        image_key: default ``"image"``.
        label_key: default ``"label"``; a batch without it gives ``None`` as the target (inference).
        task_key: default ``"task_id"``.
        mixed_tasks: default ``False``; ``True`` accepts batches mixing tasks (Hermes) and passes one task id per
            sample, ``{"task_id": LongTensor (B,)}``.

    Returns ``(image, label, (), {"task_id": int})`` so that the engine calls ``network(image, task_id=...)``.

    Raises:
        ValueError: when the batch has no ``task_key`` or (without ``mixed_tasks``) mixes tasks.
    """

    def __init__(
        self,
        image_key: str = Keys.IMAGE,
        label_key: str = Keys.LABEL,
        task_key: str = "task_id",
        mixed_tasks: bool = False,
    ) -> None:
        self.image_key, self.label_key, self.task_key = image_key, label_key, task_key
        self.mixed_tasks = bool(mixed_tasks)

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kw
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, Any]]:
        if self.task_key not in batchdata:
            raise ValueError(
                f"the batch has no {self.task_key!r}; add transforms.AttachTaskd to the preprocessing "
                f"(keys present: {sorted(batchdata)})."
            )
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kw)
        label = batchdata.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kw)
        if self.mixed_tasks:
            ids = torch.as_tensor(batchdata[self.task_key]).reshape(-1).to(device=image.device, dtype=torch.long)
            return image, label, (), {"task_id": ids}
        return image, label, (), {"task_id": _single_task_id(batchdata[self.task_key])}


class TaskEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that uses :class:`PrepareTaskBatch` by default and adds the batch's ``task_id``
    to the engine output, so that ``metrics.TaskDice`` (and any handler) can group results by task.

    Takes the same arguments as :class:`monai.engines.SupervisedEvaluator`.
    """

    def __init__(self, *args: Any, task_key: str = "task_id", **kwargs: Any) -> None:
        kwargs.setdefault("prepare_batch", PrepareTaskBatch(task_key=task_key))
        super().__init__(*args, **kwargs)
        self.task_key = task_key

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        output = super()._iteration(engine, batchdata)
        task_ids = batchdata[self.task_key]
        if isinstance(output, list):  # already decollated (MONAI decollates on MODEL_COMPLETED)
            for i, item in enumerate(output):
                item[self.task_key] = task_ids[i]
        else:
            output[self.task_key] = task_ids
        return output


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


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing every file atomically.

    MONAI's saver writes in place, so a run killed during a save leaves a truncated ``model.pt``; this one writes
    to a temporary file in the same folder and renames it into place (Ignite's atomic ``DiskSaver``), so readers
    always see the previous complete checkpoint or the new one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None and isinstance(ckpt.save_handler, DiskSaver):
                ckpt.save_handler._atomic = True  # Ignite's own temporary-file-and-rename path


class CheckpointMeta:
    """What a checkpoint needs besides the weights: the network config and the task catalog.

    It has ``state_dict()`` / ``load_state_dict()`` so that MONAI's ``CheckpointSaver`` and ``CheckpointLoader``
    store it beside the model (``save_dict={"model": net, "meta": CheckpointMeta(net, catalog)}``). Everything in
    it is plain JSON-like data, so checkpoints load with ``torch.load(..., weights_only=True)``.

    Args:
        network: a network with a ``config`` property (``UniSeg``...), or its config dict; default ``None``.
        catalog: the task catalog the network was trained on; default ``None``.
    """

    def __init__(self, network: Any = None, catalog: TaskCatalog | None = None) -> None:
        self.network_config = network.config if hasattr(network, "config") else network
        self.catalog = catalog

    def state_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "network": self.network_config,
            "catalog": None if self.catalog is None else self.catalog.to_dict(),
            "uniseg_components": __version__,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.network_config = state.get("network")
        cat = state.get("catalog")
        self.catalog = None if cat is None else TaskCatalog.from_dict(cat)


def save_checkpoint(path: str | os.PathLike, network: torch.nn.Module, catalog: TaskCatalog, **extra: Any) -> Path:
    """Write ``{"model": state_dict, "meta": CheckpointMeta, **extra}`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = network.module if hasattr(network, "module") else network
    obj = {"model": module.state_dict(), "meta": CheckpointMeta(module, catalog).state_dict(), **extra}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def build_network(config: Mapping[str, Any]) -> torch.nn.Module:
    """Rebuild a network from the ``config`` stored in a checkpoint (``{"name": "UniSeg", ...}``)."""
    from . import networks

    name = config.get("name")
    cls = getattr(networks, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        known = sorted(n for n in networks.__all__ if hasattr(getattr(networks, n), "from_config"))
        raise ValueError(f"unknown network {name!r} in checkpoint config; known: {', '.join(known)}.")
    return cls.from_config(dict(config))


def load_checkpoint(
    path: str | os.PathLike, catalog: TaskCatalog | str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, TaskCatalog]:
    """Load a checkpoint written by training into a ready network (eval mode) and its catalog.

    Args:
        path: the ``.pt`` file.
        catalog: overrides the catalog stored in the checkpoint (a catalog, JSON path or built-in name).
        map_location: device to load the tensors to, default ``"cpu"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a checkpoint of this package (corrupt, truncated or without ``meta``), or its
            weights do not fit the network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects...
        raise ValueError(f"checkpoint {str(path)!r} could not be read ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks the 'model' and 'meta' entries written by uniseg_components training "
            f"(found keys: {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})."
        )
    meta = CheckpointMeta()
    meta.load_state_dict(obj["meta"])
    cat = TaskCatalog.resolve(catalog) if catalog is not None else meta.catalog
    if cat is None:
        raise ValueError(f"checkpoint {str(path)!r} stores no catalog; pass one.")
    net = build_network(meta.network_config)
    try:
        net.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r}: weights do not fit the stored network config: {e}") from e
    if getattr(net, "num_tasks", len(cat)) != len(cat):
        raise ValueError(f"checkpoint {str(path)!r} has {net.num_tasks} tasks but the catalog has {len(cat)}.")
    logger.info("loaded %s (%s, %d tasks)", path, meta.network_config.get("name"), len(cat))
    return net.eval(), cat

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: what they hold, the one reader, and how a network is rebuilt from one.

A checkpoint written by this package is ``{"model": state_dict, "meta": CheckpointMeta, ..., "checksum": ...}``:
``meta`` holds the network's config (its ``config`` property) and the task catalog, so ``infer``, ``evaluate`` and
``export`` need nothing but the file; ``checksum`` is the SHA-256 of every other entry (tensors byte by byte), so
a damaged file is refused instead of silently giving other weights. Everything is plain data:
``torch.load(..., weights_only=True)`` reads it. The one writer is
:class:`uniseg_components.handlers.SafeCheckpointSaver` (and :func:`save_checkpoint` for code outside an engine);
:func:`read_checkpoint` is the one reader.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import unwrap
from .io import save_torch
from .tasks import TaskCatalog

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointMeta",
    "state_checksum",
    "with_checksum",
    "read_checkpoint",
    "save_checkpoint",
    "build_network",
    "load_checkpoint",
    "described_network",
    "checkpoint_catalog",
    "trained_with_mirroring",
]

logger = logging.getLogger(__name__)

#: key of the checksum entry in a checkpoint
CHECKSUM_KEY = "checksum"


class CheckpointMeta:
    """What a checkpoint needs besides the weights: the network config and the task catalog.

    It has ``state_dict()`` / ``load_state_dict()`` so that the checkpoint savers and loaders store it beside the
    model (``save_dict={"model": net, "meta": CheckpointMeta(net, catalog)}``). Everything in it is plain JSON-like
    data, so checkpoints load with ``torch.load(..., weights_only=True)``.

    Args:
        network: a network with a ``config`` property (``UniSeg``...), or its config dict; default ``None``.
        catalog: the task catalog the network was trained on; default ``None``.
        mirrored: whether training augmented with mirroring (the train configs pass their ``augment``); evaluation
            mirrors by default only a model that learnt mirrored images (:func:`trained_with_mirroring`); default
            ``None`` (not recorded).
    """

    def __init__(self, network: Any = None, catalog: TaskCatalog | None = None, mirrored: bool | None = None) -> None:
        network = unwrap(network) if isinstance(network, nn.Module) else network
        self.network_config = network.config if hasattr(network, "config") else network
        self.catalog = catalog
        self.mirrored = None if mirrored is None else bool(mirrored)

    def state_dict(self) -> dict[str, Any]:
        from . import __version__

        state = {
            "network": self.network_config,
            "catalog": None if self.catalog is None else self.catalog.to_dict(),
            "uniseg_components": __version__,
        }
        if self.mirrored is not None:
            state["trained_with_mirroring"] = self.mirrored
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.network_config = state.get("network")
        cat = state.get("catalog")
        self.catalog = None if cat is None else TaskCatalog.from_dict(cat)
        mirrored = state.get("trained_with_mirroring")
        self.mirrored = None if mirrored is None else bool(mirrored)


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of the tensor
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def state_checksum(obj: Any) -> str:
    """SHA-256 (hex) of a nested state: tensors by dtype, shape and bytes, mappings by sorted key, other values by
    ``repr``. Two states have the same checksum exactly when they hold the same values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def with_checksum(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` plus ``{"checksum": state_checksum(obj)}`` (any old checksum entry replaced)."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: state_checksum(body)}


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint"
) -> dict[str, Any]:
    """Read a checkpoint file (``weights_only``) and verify its checksum when it carries one.

    Args:
        path: the ``.pt`` file.
        map_location: device of the loaded tensors, default ``"cpu"``.
        what: what the file is, for the messages, default ``"checkpoint"``.

    Returns:
        the checkpoint's dict, without the checksum entry. A file holding a plain state dict (no ``"model"`` key,
        e.g. a model zoo's weights) is returned as it is.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (truncated, foreign pickle...), is not a dict, or its content does not
            match its checksum (damaged on disk or in transfer).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, bad CRC...
        raise ValueError(f"{what} {str(path)!r} could not be read ({type(e).__name__}: {e}).") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a dict of states.")
    stored = obj.pop(CHECKSUM_KEY, None)
    if stored is not None and state_checksum(obj) != stored:
        raise ValueError(
            f"{what} {str(path)!r} is damaged: its content does not match the checksum written with it (the file "
            "changed after it was saved); use another copy."
        )
    return obj


def save_checkpoint(path: str | os.PathLike, network: nn.Module, catalog: TaskCatalog, **extra: Any) -> Path:
    """Write ``{"model": state_dict, "meta": CheckpointMeta, **extra, "checksum": ...}`` atomically.

    For code outside an engine (the engines use :class:`uniseg_components.handlers.SafeCheckpointSaver`, which
    writes the same layout). A ``DistributedDataParallel`` wrapper is unwrapped.
    """
    module = unwrap(network)
    obj = {"model": module.state_dict(), "meta": CheckpointMeta(module, catalog).state_dict(), **extra}
    return save_torch(with_checksum(obj), path)


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network from the ``config`` stored in a checkpoint (``{"name": "UniSeg", ...}``), through the
    method that owns the network class (:mod:`uniseg_components.methods`).

    Raises:
        ValueError: no registered method has a network of that name (the message lists the known ones).
    """
    from .methods import method_of

    return method_of(config).from_config(dict(config))


def _meta(obj: Mapping[str, Any], path: Path) -> CheckpointMeta:
    if "model" not in obj or "meta" not in obj:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks the 'model' and 'meta' entries written by uniseg_components training "
            f"(found keys: {sorted(obj)})."
        )
    meta = CheckpointMeta()
    meta.load_state_dict(obj["meta"])
    return meta


def load_checkpoint(
    path: str | os.PathLike, catalog: TaskCatalog | str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, TaskCatalog]:
    """Load a checkpoint written by training into a ready network (eval mode) and its catalog.

    Args:
        path: the ``.pt`` file.
        catalog: overrides the catalog stored in the checkpoint (a catalog, JSON path or built-in name).
        map_location: device to load the tensors to, default ``"cpu"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a checkpoint of this package (corrupt, truncated, damaged or without ``meta``),
            or its weights do not fit the network.
    """
    path = Path(path)
    return _load(read_checkpoint(path, map_location), path, catalog)


def _load(obj: Mapping[str, Any], path: Path, catalog: TaskCatalog | str | None) -> tuple[nn.Module, TaskCatalog]:
    meta = _meta(obj, path)
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


def described_network(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, TaskCatalog] | None:
    """The network (weights loaded, eval mode) and catalog that a checkpoint of this package describes, or ``None``
    when ``path`` does not exist or holds a plain state dict (the model zoo's and MONAI Label's weights: the
    config's own ``network_def`` then describes the network). What an inference config that serves any checkpoint
    of its method reads (MedUniSeg's, for MedUniSeg* checkpoints).

    Raises:
        ValueError: the file exists but cannot be read, is damaged, or its weights do not fit its network config.
    """
    path = Path(path)
    if not path.is_file():
        return None
    obj = read_checkpoint(path, map_location)
    return _load(obj, path, None) if "meta" in obj and "model" in obj else None


def trained_with_mirroring(checkpoint: str | os.PathLike, default: bool = True) -> bool:
    """Whether the checkpoint's training augmented with mirroring (recorded by the train configs), so that mirroring
    test-time augmentation helps: a model trained without flips (``--augment False``) is worse on mirrored images,
    and averaging its mirrored predictions lowers the Dice. ``default`` (``True``, the papers' protocol) when the
    checkpoint does not say (written before this was recorded, or a plain state dict such as a release's
    ``models/model.pt``) or does not exist yet.

    Raises:
        ValueError: the file exists but cannot be read as a checkpoint of this package.
    """
    path = Path(checkpoint)
    if not path.is_file():
        return bool(default)
    try:  # memory-mapped: only the small meta entry is read, not the tensors (the loader reads and checks them)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read_checkpoint raises the error that names the file
        obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or "meta" not in obj:  # a plain state dict (a release's or the zoo's weights)
        return bool(default)
    mirrored = _meta(obj, path).mirrored
    return bool(default) if mirrored is None else mirrored


def checkpoint_catalog(checkpoint: str | os.PathLike) -> TaskCatalog:
    """The task catalog stored in a training checkpoint, without building the network.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read or stores no catalog.
    """
    path = Path(checkpoint)
    meta = _meta(read_checkpoint(path), path)
    if meta.catalog is None:
        raise ValueError(f"checkpoint {str(path)!r} stores no task catalog (expected a 'meta' entry with one).")
    return meta.catalog

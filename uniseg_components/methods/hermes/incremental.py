# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Incremental tasks for Hermes: add a new dataset's targets to a trained model through the catalog.

The new tasks are appended to the upstream catalog (same names, targets and modalities first, then the new
tasks: :func:`extended_catalog`); :func:`extend_checkpoint` loads the upstream checkpoint and returns a Hermes for
the extended catalog with every trained weight copied and new prior tokens (and, when needed, modality tokens and an
input stem) for what is new. :func:`param_groups` makes the optimiser's parameter groups: with ``old_lr_scale=0``
the old weights are frozen (``requires_grad_(False)``, not in the optimiser, so weight decay never touches them
either) and the old tasks' outputs stay bitwise the same; with ``0 < old_lr_scale`` they train at
``lr * old_lr_scale``.

Example (the bundle's ``add_tasks.json`` does the same)::

    net = extend_checkpoint("upstream/models/model.pt", extended_catalog)
    opt = torch.optim.AdamW(param_groups(net, old_lr_scale=0.0, lr=1e-3), weight_decay=1e-5)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ...checkpoints import checkpoint_catalog, load_checkpoint
from ...distributed import unwrap
from ...io import as_list
from ...tasks import TaskCatalog, TaskSpec
from .network import Hermes

__all__ = ["extended_catalog", "extend_checkpoint", "extend_network", "param_groups"]


def extended_catalog(
    upstream: TaskCatalog | str | os.PathLike,
    catalog: TaskCatalog | str | os.PathLike,
    new_tasks: Sequence[str] | str | None = None,
) -> TaskCatalog:
    """The catalog of an incremental run: the upstream model's tasks first, unchanged, then the new tasks.

    The upstream tasks keep their ids, label offsets (hence their target ids) and the upstream plan; the new tasks
    (3D tasks of ``catalog`` that the upstream model lacks, or the ones named) follow, numbered after them.

    Args:
        upstream: the upstream catalog, or the upstream checkpoint (``model.pt``) whose stored catalog is used.
        catalog: a catalog holding the new tasks (object, JSON file or built-in name); it may also list the old ones.
        new_tasks: names of the tasks to add (a list or a comma-separated string), default ``None`` (every 3D task
            of ``catalog`` that the upstream model lacks).

    Raises:
        ValueError: a named task is unknown, already upstream or not 3D, or there is no task to add.
    """
    if isinstance(upstream, TaskCatalog):
        old = upstream
    elif str(upstream).endswith((".pt", ".pth")):
        old = checkpoint_catalog(upstream)
    else:
        old = TaskCatalog.resolve(upstream)
    source = TaskCatalog.resolve(catalog)
    names = as_list(new_tasks)
    if not names:
        names = [t.name for t in source if t.dims == 3 and t.name not in old]
    for n in names:
        if n in old:
            raise ValueError(f"task {n!r} is already a task of the upstream model (tasks {old.names}).")
        if source[n].dims != 3:
            raise ValueError(f"task {n!r} of catalog {source.name!r} is {source[n].dims}D; only 3D tasks can be added.")
    if not names:
        raise ValueError(
            f"catalog {source.name!r} (tasks {source.names}) has no 3D task that the upstream model lacks (it has "
            f"{old.names}); give a catalog with the new tasks."
        )
    # old tasks keep their ids and label offsets (hence their target ids); new ones are numbered after them
    added = [TaskSpec(**{**source[n].to_dict(), "id": len(old) + i, "label_offset": None}) for i, n in enumerate(names)]
    return TaskCatalog(
        list(old) + added, name=f"{old.name}+{'+'.join(names)}", plan=old.plan, description=old.description
    )


def extend_network(network: Hermes, catalog: TaskCatalog | str | os.PathLike) -> Hermes:
    """``network.add_tasks(catalog)`` recording the old task names as ``old_tasks`` on the result.

    Args:
        network: a trained :class:`Hermes` (a ``DistributedDataParallel`` wrapper is unwrapped).
        catalog: the extended catalog (a catalog, JSON path or built-in name): this network's tasks first, in
            order, then the new ones.

    Raises:
        ValueError: ``network`` is not a Hermes, or the catalog does not extend its tasks.
    """
    network = unwrap(network)  # type: ignore[assignment]
    if not isinstance(network, Hermes):
        raise ValueError(f"incremental tasks need a Hermes network, got {type(network).__name__}.")
    extended = network.add_tasks(TaskCatalog.resolve(catalog))
    extended.old_tasks = list(network.task_names)
    return extended


def extend_checkpoint(
    ckpt_path: str | os.PathLike, catalog: TaskCatalog | str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Hermes:
    """Load an upstream Hermes checkpoint (``engines.load_checkpoint``) and extend it to ``catalog``.

    Args:
        ckpt_path: the upstream checkpoint (``{"model", "meta"}``, e.g. a bundle's ``models/model.pt``).
        catalog: the extended catalog (the checkpoint's tasks first, then the new ones).
        map_location: device of the loaded tensors, default ``"cpu"``.

    Returns:
        the extended network in training mode, with ``old_tasks`` set to the upstream task names.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: unreadable checkpoint, not a Hermes, or a catalog that does not extend the checkpoint's tasks
            (the message names the first mismatching task).
    """
    net, _ = load_checkpoint(ckpt_path, map_location=map_location)
    if not isinstance(net, Hermes):
        raise ValueError(f"checkpoint {str(ckpt_path)!r} holds a {type(net).__name__}; incremental tasks need Hermes.")
    return extend_network(net, catalog).train()


def param_groups(
    network: Any,
    old_lr_scale: float = 0.0,
    lr: float = 1e-3,
    old_tasks: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups for incremental training: new parameters at ``lr``, old at ``lr * old_lr_scale``.

    Args:
        network: an extended :class:`Hermes` (e.g. from :func:`extend_checkpoint`; a DDP wrapper is unwrapped).
        old_lr_scale: learning-rate factor of the old weights, default 0: frozen (``requires_grad_(False)`` and
            left out of the optimiser).
        lr: learning rate of the new parameters, default 1e-3.
        old_tasks: names of the upstream tasks, default ``None`` = ``network.old_tasks`` (set by
            :func:`extend_network` / :func:`extend_checkpoint`).

    Returns:
        ``[{"params": new, "lr": lr}]`` plus ``{"params": old, "lr": lr * old_lr_scale}`` when the scale is > 0.

    Raises:
        ValueError: negative ``old_lr_scale``, unknown old tasks, or no old tasks known.
    """
    net = unwrap(network)
    if not isinstance(net, Hermes):
        raise ValueError(f"param_groups needs a Hermes network, got {type(net).__name__}.")
    if old_lr_scale < 0:
        raise ValueError(f"old_lr_scale must be >= 0, got {old_lr_scale}.")
    old_tasks = list(old_tasks if old_tasks is not None else getattr(net, "old_tasks", None) or [])
    if not old_tasks:
        raise ValueError(
            "param_groups needs the upstream task names: pass old_tasks or extend the network with "
            "extend_checkpoint / extend_network."
        )
    new = net.new_parameters(old_tasks)
    old = net.old_parameters(old_tasks)
    for p in new:
        p.requires_grad_(True)
    for p in old:
        p.requires_grad_(old_lr_scale > 0)
    groups: list[dict[str, Any]] = [{"params": new, "lr": float(lr)}]
    if old_lr_scale > 0:
        groups.append({"params": old, "lr": float(lr) * float(old_lr_scale)})
    return groups

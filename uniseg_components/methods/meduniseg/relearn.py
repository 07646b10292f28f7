# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg*: choose the tasks to relearn and build the relearning network from a trained checkpoint.

After joint training some tasks lag behind. MedUniSeg* freezes the trained model and trains new, light modules
(:class:`~uniseg_components.methods.meduniseg.MedUniSegStar`: per-task decoder adapters) for those tasks only, so every
other task keeps exactly its output. The bundle's ``configs/relearn.json`` calls these functions.

Example::

    tasks = select_tasks(catalog, dice="eval/val_dice_per_task.json", threshold=0.5)
    star = relearn_network("models/model.pt", tasks)
    opt = torch.optim.SGD(star.trainable_parameters(), lr=1e-2, momentum=0.99, nesterov=True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ...checkpoints import load_checkpoint
from ...io import as_list, read_json
from ...tasks import TaskCatalog
from .network import MedUniSeg
from .star import MedUniSegStar

__all__ = ["read_dice", "select_tasks", "relearn_network"]


def read_dice(dice: Mapping[str, Any] | str | os.PathLike) -> dict[str, float]:
    """Mean Dice per task from a Dice table.

    Args:
        dice: ``{task: {class: dice}}`` or ``{task: dice}``, a dict with such a ``"per_task"`` entry, or the path of
            a JSON file holding one (``bundle.DiceTableHandler`` and ``python -m uniseg_components evaluate
            --output`` write them).

    Returns:
        ``{task name: mean Dice over its classes}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON or holds no per-task Dice.
    """
    where = "dice table"
    if isinstance(dice, (str, os.PathLike)):
        where = f"dice table {str(dice)!r}"
        dice = read_json(dice, "dice table", "run evaluate.json or the CLI evaluate first")
    if not isinstance(dice, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(dice).__name__}.")
    table = dice.get("per_task", dice)
    out: dict[str, float] = {}
    for task, value in table.items():
        if isinstance(value, Mapping):
            scores = [float(v) for v in value.values() if v is not None]
            if scores:
                out[str(task)] = sum(scores) / len(scores)
        elif isinstance(value, (int, float)):
            out[str(task)] = float(value)
    if not out:
        raise ValueError(f"{where} holds no per-task Dice (expected {{task: {{class: dice}}}} or a 'per_task' entry).")
    return out


def select_tasks(
    catalog: TaskCatalog | str | os.PathLike,
    tasks: Sequence[str | int] | str | int | None = None,
    dice: Mapping[str, Any] | str | os.PathLike | None = None,
    threshold: float | None = None,
) -> list[str]:
    """The tasks to relearn: the named ones, or those whose mean Dice is below ``threshold``.

    Args:
        catalog: the model's catalog.
        tasks: task names or ids (a comma-separated string works too), default ``None``.
        dice: a Dice table (see :func:`read_dice`) used with ``threshold`` when ``tasks`` is ``None``.
        threshold: tasks with mean Dice strictly below it are chosen, default ``None``.

    Returns:
        task names in catalog order.

    Raises:
        ValueError: an unknown task, neither ``tasks`` nor ``dice`` with ``threshold`` given, or nothing selected.
    """
    catalog = TaskCatalog.resolve(catalog)
    if tasks is not None and str(tasks) != "":
        tasks = [tasks] if isinstance(tasks, int) else as_list(tasks)
        names = {catalog[int(t) if str(t).isdigit() else t].name for t in tasks}
    elif dice is not None and threshold is not None:
        means = read_dice(dice)
        unknown = sorted(set(means) - set(catalog.names))
        if unknown:
            raise ValueError(f"the Dice table names task(s) {unknown} that catalog {catalog.name!r} does not have.")
        names = {t for t, d in means.items() if d < float(threshold)}
        if not names:
            raise ValueError(
                f"no task has a mean Dice below {threshold} ({', '.join(f'{t} {d:.3f}' for t, d in means.items())}); "
                "nothing to relearn."
            )
    else:
        raise ValueError("select_tasks needs task names (tasks=...) or a Dice table with a threshold.")
    if not names:
        raise ValueError("no task selected to relearn.")
    return [t.name for t in catalog if t.name in names]


def relearn_network(checkpoint: str | os.PathLike, tasks: Sequence[str | int], reduction: int = 4) -> MedUniSegStar:
    """The MedUniSeg* network that relearns ``tasks`` of a trained checkpoint.

    Args:
        checkpoint: ``model.pt`` of a MedUniSeg (or of a MedUniSeg*, whose adapters are kept).
        tasks: task names or ids of the checkpoint's catalog.
        reduction: adapter bottleneck reduction, default 4.

    Returns:
        a :class:`MedUniSegStar` in training mode; the original weights are frozen, the new adapters start at zero
        (the output equals the checkpoint's until they are trained).

    Raises:
        ValueError: the checkpoint is not a MedUniSeg, or a task is unknown.
    """
    net, catalog = load_checkpoint(checkpoint)
    if not isinstance(net, (MedUniSeg, MedUniSegStar)):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds a {type(net).__name__}; MedUniSeg* relearns MedUniSeg checkpoints."
        )
    ids = [catalog[int(t) if str(t).isdigit() else t].id for t in tasks]
    return MedUniSegStar.from_base(net, ids, reduction).train()

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Per-task, per-class Dice: the quantity UniSeg reports.

Each case gets one Dice per foreground class of its own task (an empty prediction on an empty ground truth
counts as 1, as in UniSeg's evaluation); a task's score is the mean over its classes of the mean over its cases,
and the overall score is the mean over tasks, so small datasets weigh as much as large ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.metrics import Metric
from monai.handlers import from_engine
from monai.metrics import compute_dice
from monai.utils import evenly_divisible_all_gather

from .tasks import TaskCatalog

__all__ = [
    "case_dice",
    "task_means",
    "mean_over_tasks",
    "mean_over_classes",
    "TaskDiceAggregator",
    "TaskDice",
    "format_dice_table",
]


def task_means(details: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: mean over its classes}`` of a ``{task: {class: Dice}}`` table."""
    return {task: sum(classes.values()) / len(classes) for task, classes in details.items() if classes}


def mean_over_tasks(details: dict[str, dict[str, float]]) -> float:
    """The overall score of a ``{task: {class: Dice}}`` table: the mean over tasks of the mean over classes (each
    task weighs the same); 0.0 for an empty table."""
    means = task_means(details)
    return sum(means.values()) / len(means) if means else 0.0


def mean_over_classes(details: dict[str, dict[str, float]]) -> float:
    """The papers' average of a ``{task: {class: Dice}}`` table: the mean over every class of every task (UniSeg
    reports the mean of its 17 class values, so a task with more classes weighs more); 0.0 for an empty table."""
    values = [v for classes in details.values() for v in classes.values()]
    return sum(values) / len(values) if values else 0.0


def case_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every foreground class for one case.

    Args:
        pred: predicted label map ``(1, *spatial)`` or ``(*spatial)``, integer values in ``[0, num_classes)``.
        label: ground-truth label map of the same shape.
        num_classes: the task's classes, background included.

    Returns:
        ``(num_classes - 1,)`` Dice per foreground class; 1.0 where both prediction and label are empty.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}.")
    p = torch.as_tensor(pred).reshape(1, 1, -1)
    y = torch.as_tensor(label).reshape(1, 1, -1)
    return compute_dice(p, y, include_background=False, ignore_empty=False, num_classes=num_classes)[0].float().cpu()


class TaskDiceAggregator:
    """Collects per-case Dice rows and reduces them per task and class.

    Args:
        catalog: the task catalog (class counts and names).
    """

    def __init__(self, catalog: TaskCatalog) -> None:
        self.catalog = catalog
        self.reset()

    def reset(self) -> None:
        self._rows: list[list[float]] = []  # [task_id, class_index, dice]

    def add(self, pred: torch.Tensor, label: torch.Tensor, task_id: int) -> torch.Tensor:
        """Score one case and remember it; returns its per-class Dice."""
        task = self.catalog[int(task_id)]
        d = case_dice(pred, label, task.num_classes)
        self._rows += [[float(task.id), float(c + 1), float(v)] for c, v in enumerate(d)]
        return d

    def rows(self) -> torch.Tensor:
        """All rows ``(N, 3)`` of ``[task_id, class, dice]``, gathered from every rank when distributed."""
        t = torch.tensor(self._rows, dtype=torch.float64).reshape(-1, 3)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = evenly_divisible_all_gather(t, concat=True)
        return t

    def per_task(self) -> dict[str, dict[str, float]]:
        """``{task name: {class name: mean Dice over cases}}`` for the tasks that were scored."""
        acc: dict[tuple[int, int], list[float]] = defaultdict(list)
        for tid, cls, v in self.rows().tolist():
            acc[(int(tid), int(cls))].append(v)
        out: dict[str, dict[str, float]] = {}
        for (tid, cls), vals in sorted(acc.items()):
            task = self.catalog[tid]
            out.setdefault(task.name, {})[task.labels[cls]] = sum(vals) / len(vals)
        return out

    def mean(self) -> float:
        """Mean over scored tasks of the mean class Dice; 0.0 when nothing was scored."""
        return mean_over_tasks(self.per_task())


class TaskDice(Metric):
    """Ignite metric: mean Dice over tasks (see the module docstring), for ``TaskEvaluator``.

    Args:
        catalog: the task catalog.
        output_transform: maps ``engine.state.output`` to ``(preds, labels, task_ids)``; default (``None``) reads the
            decollated ``"pred"``, ``"label"`` and ``"task_id"`` items. ``pred`` must be a label map (after
            ``AsDiscreted(argmax=True)``) or one-hot/probabilities (argmax is taken over channels).
        save_details: store the per-task table in ``engine.state.metric_details[name]`` when attached, default
            ``True``.

    ``compute()`` returns the mean; :attr:`details` holds ``{task: {class: dice}}`` after it.
    """

    def __init__(
        self,
        catalog: TaskCatalog,
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        self.aggregator = TaskDiceAggregator(catalog)
        self.save_details = save_details
        self.details: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._engine: Any = None
        super().__init__(output_transform=output_transform or from_engine(["pred", "label", "task_id"]))

    def reset(self) -> None:
        self.aggregator.reset()

    @torch.no_grad()
    def iteration_completed(self, engine: Any) -> None:
        # Ignite's default re-batches lists of tensors and expects exactly (y_pred, y); pass the triple through.
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Sequence[Any]) -> None:
        preds, labels, task_ids = output
        if isinstance(preds, torch.Tensor):  # batched, not decollated
            preds, labels, task_ids = list(preds), list(labels), list(torch.as_tensor(task_ids).reshape(-1))
        for p, y, t in zip(preds, labels, task_ids):
            p = torch.as_tensor(p)
            if p.shape[0] > 1:  # probabilities or one-hot
                p = p.argmax(0, keepdim=True)
            self.aggregator.add(p, torch.as_tensor(y), int(torch.as_tensor(t).reshape(-1)[0]))

    def compute(self) -> float:
        self.details = self.aggregator.per_task()
        if self.save_details and self._engine is not None and self._name is not None:
            self._engine.state.metric_details = getattr(self._engine.state, "metric_details", None) or {}
            self._engine.state.metric_details[self._name] = self.details
        return self.aggregator.mean()

    def attach(self, engine: Any, name: str, usage: Any = None) -> None:  # type: ignore[override]
        self._engine, self._name = engine, name
        if usage is None:
            super().attach(engine, name)
        else:
            super().attach(engine, name, usage)


def format_dice_table(
    details: dict[str, dict[str, float]],
    title: str = "Dice per task and class",
    baseline: dict[str, dict[str, float]] | None = None,
    baseline_name: str = "all-bg",
) -> str:
    """A plain-text table of ``{task: {class: dice}}`` with each task's mean, the mean over tasks and the mean over
    classes (the papers' average).

    Args:
        details: the model's Dice per task and class.
        title: first line, default ``"Dice per task and class"``.
        baseline: optional second column with the same structure (e.g. an all-background prediction).
        baseline_name: header of that column, default ``"all-bg"``.
    """
    extra = f" {baseline_name:>8}" if baseline is not None else ""
    width = 57 + len(extra)
    lines = [title, f"{'task':<20} {'class':<28} {'Dice':>7}{extra}", "-" * width]
    base_details = {task: (baseline or {}).get(task, {}) for task in details}
    means, base_means = task_means(details), task_means(base_details)

    def cell(v: float | None) -> str:
        return "" if baseline is None else (f" {v:8.4f}" if v is not None else f" {'-':>8}")

    for task, classes in details.items():
        base = (baseline or {}).get(task, {})
        for cls, v in classes.items():
            lines.append(f"{task:<20} {cls:<28} {v:7.4f}{cell(base.get(cls))}")
        lines.append(f"{task:<20} {'(task mean)':<28} {means[task]:7.4f}{cell(base_means.get(task))}")
    lines.append("-" * width)
    if means:
        bm_all = mean_over_tasks(base_details) if base_means else None
        lines.append(f"{'mean over tasks':<49} {mean_over_tasks(details):7.4f}{cell(bm_all)}")
        bc_all = mean_over_classes(base_details) if base_means else None
        lines.append(f"{'mean over classes (the papers)':<49} {mean_over_classes(details):7.4f}{cell(bc_all)}")
    return "\n".join(lines)

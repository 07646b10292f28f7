# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation of a trained checkpoint on held-out cases, on each file's own grid (``uniseg evaluate``)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from monai.transforms import LoadImage

from .data import load_datalist
from .engines import load_checkpoint
from .inferers import TaskPredictor
from .metrics import TaskDiceAggregator, format_dice_table

__all__ = ["evaluate_checkpoint"]

logger = logging.getLogger("uniseg_components.evaluation")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike,
    split: str = "validation",
    mirror: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Predict every case of a datalist split for its own task and score it against its label file.

    Predictions are brought back to the grid of the input file (``TaskPredictor``) and compared with the label
    file as stored. The all-background prediction is scored on the same cases as the baseline to beat.

    Args:
        checkpoint: ``model.pt`` written by training.
        datalist: ``datalist.json`` from ``prepare``.
        split: ``"validation"`` (default) or ``"training"``.
        mirror: mirroring TTA on every axis, default ``False``.
        device: default CUDA when available else CPU.

    Returns:
        ``{"mean", "baseline_mean", "per_task", "baseline_per_task", "cases", "table"}``.
    """
    if split not in ("validation", "training"):
        raise ValueError(f"split must be 'validation' or 'training', got {split!r}.")
    net, cat = load_checkpoint(checkpoint)
    train_items, val_items, _ = load_datalist(datalist)
    items = [it for it in (val_items if split == "validation" else train_items) if it["task"] in cat]
    if not items:
        raise ValueError(f"datalist {str(datalist)!r} has no {split} case of the checkpoint's tasks {cat.names}.")
    mirror_axes = tuple(range(net.plan.spatial_dims)) if mirror else ()
    predictor = TaskPredictor(net, cat, mirror_axes=mirror_axes, device=device)
    model, baseline = TaskDiceAggregator(cat), TaskDiceAggregator(cat)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    t0 = time.time()
    for i, it in enumerate(items, 1):
        task = cat[it["task"]]
        pred = predictor.predict(it["image"], task.name)
        label = load(it["label"]).round().to(torch.int16)
        if tuple(label.shape) != tuple(pred.shape):
            raise ValueError(
                f"{it['label']}: label shape {tuple(label.shape)} differs from the prediction's {tuple(pred.shape)} "
                f"on the image grid of {it['image']}."
            )
        d = model.add(pred, label, task.id)
        baseline.add(torch.zeros_like(label), label, task.id)
        name = os.path.basename(str(it["image"]))
        logger.info("[%d/%d] %s %s Dice %s", i, len(items), task.name, name, [round(float(v), 4) for v in d])
    per_task, base = model.per_task(), baseline.per_task()
    table = format_dice_table(
        per_task, title=f"{split} Dice on {len(items)} held-out case(s), {time.time() - t0:.0f} s", baseline=base
    )
    return {
        "mean": model.mean(),
        "baseline_mean": baseline.mean(),
        "per_task": per_task,
        "baseline_per_task": base,
        "cases": len(items),
        "table": table,
    }

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Upstream joint training of UniSeg with MONAI's Ignite engines (the Python API behind ``uniseg train``).

Every part is a MONAI or ``uniseg_components`` component; this module only wires them: a cached dataset with the
catalog-driven transforms, the task-balanced batch sampler, ``SupervisedTrainer`` with :class:`PrepareTaskBatch`,
SGD (Nesterov) with the poly schedule, gradient clipping, and a :class:`TaskEvaluator` that validates per task
with the task-aware sliding window and keeps the best checkpoint by mean Dice over tasks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler
from monai.transforms import AsDiscreted
from monai.utils import set_determinism

from .data import TaskBalancedBatchSampler, load_datalist
from .engines import (
    CheckpointMeta,
    GradientClipHandler,
    PrepareTaskBatch,
    SafeCheckpointSaver,
    TaskEvaluator,
    save_checkpoint,
)
from .inferers import TaskSlidingWindowInferer
from .losses import TaskDiceCELoss
from .metrics import TaskDice, format_dice_table
from .networks import UniSeg
from .tasks import TaskCatalog
from .transforms import train_transforms, val_transforms

__all__ = ["default_device", "train"]

logger = logging.getLogger("uniseg_components.training")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    datalist: str | os.PathLike,
    catalog: str | os.PathLike | TaskCatalog | None = None,
    output_dir: str | os.PathLike = "runs/uniseg",
    epochs: int = 1000,
    batches_per_task: int = 50,
    batch_size: int = 2,
    learning_rate: float = 1e-2,
    momentum: float = 0.99,
    weight_decay: float = 3e-5,
    max_grad_norm: float = 12.0,
    val_interval: int = 1,
    patch_size: Sequence[int] | None = None,
    plan_overrides: dict[str, Any] | None = None,
    augment: bool = True,
    device: str | None = None,
    amp: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    sw_batch_size: int = 2,
    log_every: int = 10,
) -> dict[str, Any]:
    """Train UniSeg on every task of a datalist and keep the best checkpoint by mean validation Dice over tasks.

    Args:
        datalist: JSON written by ``uniseg prepare`` (``training`` and ``validation`` lists of
            ``{image, label, task}``).
        catalog: catalog JSON, built-in name or catalog; default the ``catalog`` entry of the datalist. 2D tasks
            are dropped (UniSeg is 3D).
        output_dir: where ``model.pt`` (best by validation Dice) and ``model_final.pt`` (last epoch) go, both with
            the network config and the catalog inside; default ``"runs/uniseg"``.
        epochs: training epochs, default 1000 (UniSeg's).
        batches_per_task: batches of every task per epoch, default 50 (UniSeg's).
        batch_size: samples per batch, all from one task, default 2.
        learning_rate: initial SGD learning rate, default 1e-2; poly decay with exponent 0.9 per epoch.
        momentum: Nesterov momentum, default 0.99.
        weight_decay: default 3e-5.
        max_grad_norm: gradient clipping, default 12.
        val_interval: validate every this many epochs, default 1.
        patch_size: training patch, default the catalog plan's.
        plan_overrides: other plan fields (``features``...), default none.
        augment: nnU-Net-style augmentation, default ``True``.
        device: default CUDA when available else CPU.
        amp: mixed precision, default on for CUDA only.
        seed: seeds weights, sampler and augmentation, default 0.
        num_workers: data loader workers, default 0.
        sw_batch_size: sliding-window batch for validation, default 2.
        log_every: log the loss every this many iterations, default 10.

    Returns:
        ``{"best_metric", "best_epoch", "checkpoint", "details", "seconds"}``; ``checkpoint`` is the best one, or the
        final one when validation never ran.
    """
    t0 = time.time()
    train_items, val_items, datalist_catalog = load_datalist(datalist)
    cat = TaskCatalog.resolve(catalog if catalog is not None else datalist_catalog)
    three_d = [t.name for t in cat if t.dims == 3]
    dropped = [t.name for t in cat if t.dims != 3]
    if dropped:
        logger.info("UniSeg is 3D: leaving out 2D task(s) %s", dropped)
    # renumber the 3D tasks densely; items of dropped tasks leave the datalists
    cat = cat.select(names=three_d)
    train_items = [it for it in train_items if it["task"] in cat]
    val_items = [it for it in val_items if it["task"] in cat]
    if not train_items:
        raise ValueError(f"datalist {str(datalist)!r} has no training item of a 3D task in catalog {cat.names}.")

    dev = default_device(device)
    use_amp = dev.type == "cuda" if amp is None else bool(amp)
    set_determinism(seed=seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    net = UniSeg.from_catalog(cat, patch_size=patch_size, **(plan_overrides or {})).to(dev)
    # channels-last 3D tensors make oneDNN's CPU convolutions about 25% faster (docs/benchmarks.md)
    to_kwargs = {"memory_format": torch.channels_last_3d} if dev.type == "cpu" else {}
    net = net.to(**to_kwargs)
    roi = net.plan.patch_size
    logger.info(
        "UniSeg: %d tasks %s, %.2f M parameters, patch %s, device %s, amp %s",
        len(cat),
        cat.names,
        sum(p.numel() for p in net.parameters()) / 1e6,
        list(roi),
        dev,
        use_amp,
    )

    train_ds = CacheDataset(train_items, train_transforms(cat, augment=augment), num_workers=num_workers or None)
    sampler = TaskBalancedBatchSampler.from_items(
        train_items, cat, batch_size=batch_size, batches_per_task=batches_per_task, seed=seed
    )
    train_loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=num_workers)

    optimizer = torch.optim.SGD(
        net.parameters(), lr=learning_rate, momentum=momentum, nesterov=True, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=0.9)
    meta = CheckpointMeta(net, cat)

    evaluator = None
    if val_items:
        val_ds = CacheDataset(val_items, val_transforms(cat), num_workers=num_workers or None)
        evaluator = TaskEvaluator(
            device=dev,
            val_data_loader=DataLoader(val_ds, batch_size=1, num_workers=num_workers),
            network=net,
            inferer=TaskSlidingWindowInferer(roi, sw_batch_size=sw_batch_size, overlap=0.5),
            postprocessing=AsDiscreted(keys="pred", argmax=True),
            key_val_metric={"val_mean_dice": TaskDice(cat)},
            val_handlers=[
                StatsHandler(iteration_log=False),
                SafeCheckpointSaver(
                    save_dir=str(out),
                    save_dict={"model": net, "meta": meta},
                    save_key_metric=True,
                    key_metric_filename="model.pt",
                ),
            ],
            amp=use_amp,
            to_kwargs=to_kwargs,
        )

        @evaluator.on(Events.COMPLETED)
        def _log_table(engine: Any) -> None:
            details = engine.state.metric_details.get("val_mean_dice", {})
            logger.info("epoch %d validation\n%s", trainer.state.epoch, format_dice_table(details))

    handlers: list[Any] = [
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
        StatsHandler(
            tag_name="train_loss",
            output_transform=lambda output: output["loss"].item(),
            iteration_log=lambda engine, _: engine.state.iteration % log_every == 0,
        ),
        GradientClipHandler(max_grad_norm),
    ]
    if evaluator is not None:
        handlers.append(ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True))
    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=TaskDiceCELoss(),
        prepare_batch=PrepareTaskBatch(),
        train_handlers=handlers,
        amp=use_amp,
        decollate=False,
        to_kwargs=to_kwargs,
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _log_epoch(engine: Any) -> None:
        logger.info(
            "epoch %d/%d done: %d iterations, %.0f s elapsed, lr %.2e",
            engine.state.epoch,
            epochs,
            engine.state.iteration,
            time.time() - t0,
            optimizer.param_groups[0]["lr"],
        )

    trainer.run()
    final = save_checkpoint(out / "model_final.pt", net, cat)
    best = out / "model.pt"
    result: dict[str, Any] = {"checkpoint": str(final), "best_metric": None, "best_epoch": None, "details": {}}
    if evaluator is not None and evaluator.state.best_metric_epoch > 0:
        result.update(
            best_metric=float(evaluator.state.best_metric),
            best_epoch=int(evaluator.state.best_metric_epoch),
            details=evaluator.state.metric_details.get("val_mean_dice", {}),
            checkpoint=str(best),
        )
    result["seconds"] = time.time() - t0
    return result

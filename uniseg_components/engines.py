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
from collections.abc import Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.utils import CommonKeys as Keys

__all__ = ["PrepareTaskBatch", "TaskEvaluator"]

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
        plain_tensors: hand the image and label over as plain ``torch.Tensor`` (no ``MetaTensor`` metadata), default
            ``False``. The trainers use ``True``: training needs no metadata, every operation on a ``MetaTensor``
            passes through its ``__torch_function__``, and MONAI's compiled trainer fails putting a batch's collated
            metadata back on the prediction. Evaluators keep the metadata (``Invertd`` needs it).

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
        plain_tensors: bool = False,
    ) -> None:
        self.image_key, self.label_key, self.task_key = image_key, label_key, task_key
        self.mixed_tasks = bool(mixed_tasks)
        self.plain_tensors = bool(plain_tensors)

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
        if self.plain_tensors:
            image = image.as_tensor() if isinstance(image, MetaTensor) else image
            label = label.as_tensor() if isinstance(label, MetaTensor) else label
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

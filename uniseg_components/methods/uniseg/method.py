# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg as a method: its networks (the upstream model and the fine-tuned downstream model), bundles, loss, export
and benchmark."""

from __future__ import annotations

import torch
from torch import nn

from ...distributed import unwrap
from ...export import TaskInputs
from ...losses import TaskDiceCELoss
from ...tasks import TaskCatalog
from ..base import Method
from . import benchmark
from .downstream import UniSegDownstream
from .export import UniSegExportable
from .network import UniSeg

__all__ = ["UniSegMethod"]


class UniSegMethod(Method):
    """UniSeg (Ye et al., MICCAI 2023): a universal prompt and FUSE give a task-specific prompt at the decoder input;
    softmax over each task's own classes. Its downstream model (:class:`UniSegDownstream`, no prompt, one task) is
    the fine-tuning lifecycle (``finetune.py``)."""

    name = "uniseg"
    title = "UniSeg"
    networks = (UniSeg, UniSegDownstream)
    bundles = {"UniSeg": "uniseg_universal_segmentation", "UniSegDownstream": "uniseg_finetune_segmentation"}
    output = "softmax"
    dims = (3,)
    loss_class = TaskDiceCELoss
    benchmark = benchmark

    def torchscript(
        self, network: nn.Module, catalog: TaskCatalog | None = None, default_task: int | None = None
    ) -> torch.jit.ScriptModule:
        """``(x, task_id)`` -> logits padded to ``max(num_classes)`` channels (one trace per stem); a downstream
        model takes ``x`` only."""
        net = unwrap(network)
        with torch.no_grad():
            if isinstance(net, UniSegDownstream):
                return torch.jit.script(net.eval())
            return torch.jit.script(UniSegExportable.from_uniseg(net, int(default_task or 0)).eval())

    def onnx_example(
        self, network: nn.Module, catalog: TaskCatalog | None, channels: int | None, default_task: int | None
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
        """Inputs ``image`` ``(B, C, *patch)`` and ``task_id`` ``(1,)`` int64 (a downstream model: ``image`` only),
        output ``pred`` ``(B, max(num_classes), *patch)``, dynamic batch."""
        axes = {"image": {0: "batch"}, "pred": {0: "batch"}}
        if isinstance(network, UniSegDownstream):
            return network.eval(), (network.example_input(channels),), ["image"], axes
        if default_task is None and channels is not None and catalog is not None:
            default_task = next(t.id for t in catalog if t.num_channels == int(channels))
        exp = UniSegExportable.from_uniseg(network, int(default_task or 0)).eval()
        return TaskInputs(exp), exp.example_inputs(channels=channels), ["image", "task_id"], axes

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg as a method: its networks (the upstream model and the fine-tuned downstream model), bundles, loss, export
and benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...distributed import unwrap
from ...export import TaskInputs, onnx_export
from ...losses import TaskDiceCELoss
from ...tasks import TaskCatalog
from ..base import Method
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

    def build(self, catalog: TaskCatalog, **kwargs: Any) -> UniSeg:
        return UniSeg.from_catalog(catalog, **kwargs)

    def loss(self, **kwargs: Any) -> nn.Module:
        return TaskDiceCELoss(**kwargs)

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

    def onnx(
        self,
        network: nn.Module,
        filepath: str | Path,
        catalog: TaskCatalog | None = None,
        channels: int | None = None,
        default_task: int | None = None,
        opset_version: int = 18,
    ) -> Path:
        """Inputs ``image`` ``(B, C, *patch)`` and ``task_id`` ``(1,)`` int64 (a downstream model: ``image`` only),
        output ``pred`` ``(B, max(num_classes), *patch)``, dynamic batch."""
        net = unwrap(network)
        axes = {"image": {0: "batch"}, "pred": {0: "batch"}}
        if isinstance(net, UniSegDownstream):
            x = net.example_input(channels)
            return onnx_export(net, (x,), filepath, ["image"], axes, opset_version)
        if default_task is None and channels is not None and catalog is not None:
            default_task = next(t.id for t in catalog if t.num_channels == int(channels))
        exp = UniSegExportable.from_uniseg(net, int(default_task or 0)).eval()
        return onnx_export(
            TaskInputs(exp), exp.example_inputs(channels=channels), filepath, ["image", "task_id"], axes, opset_version
        )

    def run_benchmark(
        self,
        catalog: TaskCatalog | str | None = None,
        patch_size: Sequence[int] | None = None,
        repeats: int = 3,
        device: str | None = None,
    ) -> dict[str, Any]:
        from .benchmark import run_benchmark

        return run_benchmark(catalog, patch_size=patch_size, repeats=repeats, device=device)

    def format_benchmark(self, result: Mapping[str, Any]) -> str:
        from .benchmark import format_report

        return format_report(dict(result))

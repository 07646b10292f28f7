# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg as a method: its networks (MedUniSeg and the relearned MedUniSeg*), bundle, loss, export, benchmark."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...distributed import unwrap
from ...export import TaskInputs
from ...losses import TaskDiceCELoss
from ...tasks import TaskCatalog
from ..base import Method
from . import benchmark
from .export import MedUniSegExportable, scriptable_meduniseg
from .network import MedUniSeg
from .star import MedUniSegStar

__all__ = ["MedUniSegMethod"]


def _patches(catalog: TaskCatalog | None) -> list[tuple[int, ...]] | None:
    return None if catalog is None else [tuple(t.patch_size) for t in catalog]


class MedUniSegMethod(Method):
    """MedUniSeg (Ye et al., 2024): modal prompts + MMap at the encoder start, task prompt + FUSE at its end, 2D and
    3D tasks with the same weights; softmax over each task's classes. MedUniSeg* (:class:`MedUniSegStar`,
    ``relearn.py``) relearns weak tasks with adapters on the frozen model."""

    name = "meduniseg"
    title = "MedUniSeg"
    networks = (MedUniSeg, MedUniSegStar)
    bundles = {"MedUniSeg": "meduniseg_universal_segmentation", "MedUniSegStar": "meduniseg_universal_segmentation"}
    output = "softmax"
    dims = (2, 3)
    loss_class = TaskDiceCELoss
    benchmark = benchmark

    def _exportable(
        self, network: nn.Module, catalog: TaskCatalog | None, default_task: int | None
    ) -> MedUniSegExportable:
        return MedUniSegExportable(unwrap(network), int(default_task or 0), _patches(catalog))

    def torchscript(
        self, network: nn.Module, catalog: TaskCatalog | None = None, default_task: int | None = None
    ) -> torch.jit.ScriptModule:
        """``(x, task_id)`` -> logits padded to ``max(num_classes)`` channels, one trace per channel count and task
        patch (2D and 3D), each task's patch from ``catalog`` (default the plan's)."""
        with torch.no_grad():
            return torch.jit.script(scriptable_meduniseg(self._exportable(network, catalog, default_task)))

    def onnx_example(
        self, network: nn.Module, catalog: TaskCatalog | None, channels: int | None, default_task: int | None
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
        """Inputs ``image`` ``(B, C, *patch)`` and ``task_id`` ``(1,)`` int64 for the channel count and patch of
        ``default_task`` (default the first task with ``channels`` inputs), output ``pred``."""
        if default_task is None and channels is not None:
            default_task = next(t for t, mods in enumerate(network.task_modalities) if len(mods) == int(channels))
        exp = self._exportable(network, catalog, default_task).eval()
        axes = {"image": {0: "batch"}, "pred": {0: "batch"}}
        return TaskInputs(exp), exp.example_inputs(), ["image", "task_id"], axes

    def onnx_graphs(self, network: nn.Module, catalog: TaskCatalog) -> dict[str, dict[str, Any]]:
        """One graph per channel count and task patch: ``c<C>_<patch>`` (2D and 3D tasks)."""
        kinds = self._exportable(network, catalog, 0).input_kinds()
        return {f"c{c}_{'x'.join(map(str, patch))}": {"default_task": task} for c, patch, task in kinds}

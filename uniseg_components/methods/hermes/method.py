# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes as a method: its network, bundle, partial-label loss, export and benchmark."""

from __future__ import annotations

import torch
from torch import nn

from ...distributed import unwrap
from ...tasks import TaskCatalog
from ..base import Method
from . import benchmark
from .export import HermesExportable, hermes_example_inputs, scriptable_hermes
from .loss import HermesLoss
from .network import Hermes

__all__ = ["HermesMethod"]


class HermesMethod(Method):
    """Hermes (Gao et al., CVPR 2024): task and modality prior tokens fused with the features by two-way attention;
    posterior prototypes give one sigmoid mask per requested target (targets may overlap; partial labels). Adding
    tasks to a trained model is its lifecycle (``incremental.py``)."""

    name = "hermes"
    title = "Hermes"
    networks = (Hermes,)
    bundles = {"Hermes": "hermes_universal_segmentation"}
    output = "sigmoid"
    dims = (3,)
    loss_class = HermesLoss
    benchmark = benchmark

    def torchscript(
        self, network: nn.Module, catalog: TaskCatalog | None = None, default_task: int | None = None
    ) -> torch.jit.ScriptModule:
        """``(x, task_ids, modality_id)`` -> per-target logits ``(B, n, *patch)``, one trace per stem."""
        with torch.no_grad():
            return torch.jit.script(scriptable_hermes(unwrap(network)))

    def onnx_example(
        self, network: nn.Module, catalog: TaskCatalog | None, channels: int | None, default_task: int | None
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
        """Inputs ``image`` ``(B, C, *patch)``, ``task_ids`` ``(1, n)`` int64 (dynamic ``n``) and ``modality_id``
        ``(1,)`` int64; output ``pred`` ``(B, n, *patch)``. The example request is ``default_task``'s targets."""
        network = network.eval()
        inputs = hermes_example_inputs(network, channels, default_task)
        axes = {"image": {0: "batch"}, "task_ids": {1: "targets"}, "pred": {0: "batch", 1: "targets"}}
        return HermesExportable(network), inputs, ["image", "task_ids", "modality_id"], axes

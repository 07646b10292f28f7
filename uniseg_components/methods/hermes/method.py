# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes as a method: its network, bundle, partial-label loss, export and benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...distributed import unwrap
from ...export import onnx_export
from ...tasks import TaskCatalog
from ..base import Method
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

    def build(self, catalog: TaskCatalog, **kwargs: Any) -> Hermes:
        return Hermes.from_catalog(catalog, **kwargs)

    def loss(self, **kwargs: Any) -> nn.Module:
        return HermesLoss(**kwargs)

    def torchscript(
        self, network: nn.Module, catalog: TaskCatalog | None = None, default_task: int | None = None
    ) -> torch.jit.ScriptModule:
        """``(x, task_ids, modality_id)`` -> per-target logits ``(B, n, *patch)``, one trace per stem."""
        with torch.no_grad():
            return torch.jit.script(scriptable_hermes(unwrap(network)))

    def onnx(
        self,
        network: nn.Module,
        filepath: str | Path,
        catalog: TaskCatalog | None = None,
        channels: int | None = None,
        default_task: int | None = None,
        opset_version: int = 18,
    ) -> Path:
        """Inputs ``image`` ``(B, C, *patch)``, ``task_ids`` ``(1, n)`` int64 (dynamic ``n``) and ``modality_id``
        ``(1,)`` int64; output ``pred`` ``(B, n, *patch)``. The example request is ``default_task``'s targets."""
        net = unwrap(network).eval()
        inputs = hermes_example_inputs(net, channels, default_task)
        axes = {"image": {0: "batch"}, "task_ids": {1: "targets"}, "pred": {0: "batch", 1: "targets"}}
        return onnx_export(
            HermesExportable(net), inputs, filepath, ["image", "task_ids", "modality_id"], axes, opset_version
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

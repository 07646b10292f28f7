# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript and ONNX export of any method's network, with the task as a model input.

The generic entry points (:func:`export_torchscript`, :func:`export_onnx`, :func:`export_checkpoint`, the CLI's
``export``) ask the network's method (:func:`uniseg_components.methods.method_of`) for its traceable form; each
method's unit holds its own exportable wrapper (``methods/<name>/export.py``). The pieces they share are here:

* the task as a ``(1,)`` long tensor (:func:`task_tensor`) and the class mask that pads one task's logits to the
  widest task's channel count with the lowest float value, so that softmax / argmax equal the eager network's
  (:func:`class_mask`, :func:`mask_classes`);
* one ``torch.jit.trace`` per input kind (channel count, and patch for methods with 2D and 3D tasks), dispatched
  by a small scripted module (:class:`TracedByInput`), since a trace fixes the input stem and rank;
* saving a TorchScript module with extra files, and the ONNX export call.

Example::

    net, catalog = load_checkpoint("model.pt")
    ts = export_torchscript(net, "model.ts", catalog=catalog)
    logits = ts(x, torch.tensor([2]))[:, : catalog[2].num_classes]
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import unwrap
from .io import atomic_path
from .tasks import TaskCatalog

__all__ = [
    "task_tensor",
    "class_mask",
    "mask_classes",
    "TaskInputs",
    "TracedByInput",
    "trace",
    "save_torchscript",
    "onnx_export",
    "export_torchscript",
    "export_onnx",
    "export_checkpoint",
]

logger = logging.getLogger(__name__)


def task_tensor(task_id: torch.Tensor | int | None, default: int, device: torch.device | str) -> torch.Tensor:
    """The task id as a ``(1,)`` long tensor on ``device``: the first entry of ``task_id``, or ``default``."""
    if task_id is None:
        return torch.full((1,), int(default), dtype=torch.long, device=device)
    return torch.as_tensor(task_id, device=device).to(torch.long).reshape(-1)[:1]


def class_mask(num_classes: Sequence[int]) -> torch.Tensor:
    """``(T, max(num_classes))`` bool: row ``t`` is ``True`` on task ``t``'s own classes."""
    mask = torch.zeros(len(num_classes), max(num_classes), dtype=torch.bool)
    for t, k in enumerate(num_classes):
        mask[t, :k] = True
    return mask


def mask_classes(out: torch.Tensor, mask: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
    """``out`` ``(B, Kmax, *spatial)`` with the channels beyond task ``task_id``'s classes at the lowest float value."""
    keep = torch.index_select(mask, 0, task_id).reshape(1, -1, *([1] * (out.ndim - 2)))
    return out.masked_fill(~keep, torch.finfo(out.dtype).min)


class TaskInputs(nn.Module):
    """Trace target: ``forward(x, task_id)`` of ``network`` with both arguments required."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        return self.network(x, task_id)


class TracedByInput(nn.Module):
    """Scripted dispatch over traces, one per input kind: calls the trace whose channel count (and, when given,
    spatial size) matches ``x``.

    ``forward(x, task_id=None)``: ``task_id`` a ``(1,)`` long tensor, default ``default_task``.

    Args:
        traced: the traces, each taking ``(x, task_id)``.
        channels: the input channel count of each trace.
        sizes: the spatial size of each trace's input, default ``None`` (any size of the right channel count).
        default_task: default 0.
    """

    def __init__(
        self,
        traced: Sequence[nn.Module],
        channels: Sequence[int],
        sizes: Sequence[Sequence[int]] | None = None,
        default_task: int = 0,
    ) -> None:
        super().__init__()
        self.traced = nn.ModuleList(traced)
        # no annotations here: TorchScript infers the list types from the values, and warns on annotated lists
        self.channels = [int(c) for c in channels]
        # [-1] stands for "any size" (a TorchScript list attribute needs a non-empty element to infer its type)
        self.sizes = [list(s) for s in sizes] if sizes is not None else [[-1] for _ in channels]
        self.default_task = int(default_task)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if task_id is None:
            task_id = torch.full([1], self.default_task, dtype=torch.long, device=x.device)
        size = x.shape[2:]
        i = 0
        for m in self.traced:
            if self.channels[i] == x.shape[1] and (self.sizes[i][0] < 0 or self.sizes[i] == size):
                return m(x, task_id)
            i += 1
        raise ValueError("input channel count and spatial size do not match the patch of any task of the network")


def trace(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` in eval mode without gradients. The networks' shape checks run as Python bools in the
    trace: constant for the traced input kind, as intended, so their tracer warnings are silenced."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module.eval(), example_inputs, check_trace=False)


def save_torchscript(
    module: torch.jit.ScriptModule, filepath: str | os.PathLike, extra_files: Mapping[str, Any] | None = None
) -> Path:
    """Save a TorchScript module atomically with extra files (str/bytes, or JSON-able objects written as JSON)."""
    files = {k: v if isinstance(v, (bytes, str)) else json.dumps(v) for k, v in (extra_files or {}).items()}
    with atomic_path(filepath) as tmp:
        torch.jit.save(module, str(tmp), _extra_files=files)
    return Path(filepath)


def onnx_export(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    filepath: str | os.PathLike,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset_version: int = 18,
) -> Path:
    """``torch.onnx.export`` (TorchScript-based exporter) of ``module`` in eval mode to ``filepath`` (atomically),
    output named ``pred``; the train/eval mode of every submodule is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.no_grad(), warnings.catch_warnings(), atomic_path(filepath) as tmp:
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module.eval(),
                inputs,
                str(tmp),
                input_names=list(input_names),
                output_names=["pred"],
                opset_version=opset_version,
                dynamo=False,
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            )
    finally:
        for m, training in modes:
            m.training = training
    return Path(filepath)


def export_torchscript(
    network: nn.Module,
    filepath: str | os.PathLike | None = None,
    default_task: int | None = None,
    extra_files: Mapping[str, Any] | None = None,
    catalog: TaskCatalog | None = None,
) -> torch.jit.ScriptModule:
    """TorchScript of any method's network (the method's ``torchscript``), saved to ``filepath`` when given.

    UniSeg and MedUniSeg models take ``(x, task_id)``, Hermes ``(x, task_ids, modality_id)``; see each method's
    ``export.py``.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is unwrapped).
        filepath: ``.ts`` file to write, default ``None`` (not saved).
        default_task: task used when ``task_id`` is not given, default the first.
        extra_files: name -> str/bytes/JSON-able object embedded as TorchScript extra files, default none.
        catalog: the network's catalog, default ``None``; methods with per-task patches (MedUniSeg) trace each task's
            patch from it.

    Raises:
        ValueError: no registered method owns the network.
    """
    from .methods import method_of

    net = unwrap(network)
    ts = method_of(net).torchscript(net, catalog=catalog, default_task=default_task)
    if filepath is not None:
        save_torchscript(ts, filepath, extra_files)
    return ts


def export_onnx(
    network: nn.Module,
    filepath: str | os.PathLike,
    channels: int | None = None,
    default_task: int | None = None,
    opset_version: int = 18,
    catalog: TaskCatalog | None = None,
) -> Path:
    """One ONNX graph of any method's network (the method's ``onnx``): inputs ``image`` ``(B, C, *patch)`` and the
    task (``task_id`` ``(1,)`` int64; Hermes: ``task_ids`` ``(1, n)`` and ``modality_id`` ``(1,)``), output ``pred``.

    Args:
        network: the trained network.
        filepath: ``.onnx`` file to write.
        channels: input channels of the graph, default the first stem's (or ``default_task``'s).
        default_task: task of the example input, default the first taking ``channels`` inputs.
        opset_version: ONNX opset, default 18.
        catalog: the network's catalog, default ``None`` (MedUniSeg: each task's patch).
    """
    from .methods import method_of

    net = unwrap(network)
    return method_of(net).onnx(
        net, filepath, catalog=catalog, channels=channels, default_task=default_task, opset_version=opset_version
    )


def export_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("torchscript", "onnx"),
    catalog: TaskCatalog | str | None = None,
) -> dict[str, Path]:
    """Export a training checkpoint to ``model.ts`` (with ``catalog.json`` and ``network.json`` inside) and/or the
    ONNX graphs its method needs for every input kind (``model_<kind>.onnx``).

    Args:
        ckpt: checkpoint written by training (the CLI or a bundle's ``models/model.pt``).
        out_dir: output folder.
        formats: any of ``"torchscript"``, ``"onnx"``, default both.
        catalog: overrides the catalog stored in the checkpoint, default ``None``.

    Returns:
        ``"torchscript"`` / ``"onnx_<kind>"`` -> written path.
    """
    from .checkpoints import load_checkpoint
    from .methods import method_of

    unknown = set(formats) - {"torchscript", "onnx"}
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; expected 'torchscript' and/or 'onnx'.")
    net, cat = load_checkpoint(ckpt, catalog=catalog)
    method = method_of(net)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if "torchscript" in formats:
        extra = {"catalog.json": cat.to_dict(), "network.json": net.config}
        written["torchscript"] = out_dir / "model.ts"
        export_torchscript(net, written["torchscript"], extra_files=extra, catalog=cat)
    if "onnx" in formats:
        for kind, kw in method.onnx_graphs(net, cat).items():
            written[f"onnx_{kind}"] = method.onnx(net, out_dir / f"model_{kind}.onnx", catalog=cat, **kw)
    for kind, path in written.items():
        logger.info("exported %s: %s", kind, path)
    return written

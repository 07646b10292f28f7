# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript and ONNX export of UniSeg with the task id as a model input.

:class:`UniSeg`'s eager ``forward(x, task_id)`` picks the task with Python logic (an ``int``), slices the
output to the task's classes and selects the input stem by channel count, none of which survives
``torch.jit.trace``. :class:`UniSegExportable` is a drop-in subclass (identical state-dict keys, so any UniSeg
checkpoint loads into it) whose forward is traceable with the task as a tensor:

* the task prompt is picked with ``index_select`` on a ``task_id`` tensor (so one traced graph serves every
  task);
* the output always has ``max(num_classes)`` channels; channels beyond the task's classes are filled with the
  lowest float value, so ``softmax`` / ``argmax`` equal those of the eager output, and ``out[:, :K_task]`` equals
  it;
* ``task_id=None`` uses ``default_task`` (what MONAI's one-input ``ckpt_export`` / ``onnx_export`` trace or
  check with).

``torch.jit.script`` of it (MONAI's ``ckpt_export`` without ``--use_trace``) goes through
``__prepare_scriptable__``: one trace per input channel count of the network, dispatched by a small scripted
module, so the TorchScript model takes ``(x, task_id)`` for every task and every stem.

Example::

    net = UniSegExportable.from_catalog(catalog, default_task=0)
    net.load_state_dict(torch.load("model.pt", weights_only=True)["model"])
    ts = export_torchscript(net, "model.ts")
    logits = ts(x, torch.tensor([2]))[:, : catalog[2].num_classes]
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .networks.hermes import Hermes
from .networks.meduniseg import MedUniSeg, MedUniSegStar, twin_tensors
from .networks.plans import UNetPlan
from .networks.uniseg import UniSeg
from .tasks import TaskCatalog

__all__ = [
    "MedUniSegExportable",
    "ScriptableMedUniSeg",
    "UniSegExportable",
    "ScriptableUniSeg",
    "ScriptableHermes",
    "hermes_example_inputs",
    "export_torchscript",
    "export_onnx",
    "export_checkpoint",
]


class UniSegExportable(UniSeg):
    """UniSeg with a traceable forward taking the task id as a tensor (see the module docstring).

    Args:
        plan: the network plan.
        num_classes: classes per task (background included).
        in_channels: input channel counts, one stem each, default ``(1,)``.
        default_task: task id used when ``forward`` gets no ``task_id``, default ``0``.
    """

    def __init__(
        self, plan: UNetPlan, num_classes: Sequence[int], in_channels: Sequence[int] = (1,), default_task: int = 0
    ) -> None:
        super().__init__(plan, num_classes, in_channels)
        if not 0 <= int(default_task) < self.num_tasks:
            raise ValueError(f"default_task must be a task id in [0, {self.num_tasks}), got {default_task}.")
        self.default_task = int(default_task)
        k_max = max(self.num_classes)
        mask = torch.zeros(self.num_tasks, k_max, dtype=torch.bool)
        for t, k in enumerate(self.num_classes):
            mask[t, :k] = True
        # not persistent: the state dict keeps exactly UniSeg's keys
        self.register_buffer("class_mask", mask, persistent=False)

    @classmethod
    def from_catalog(  # type: ignore[override]
        cls,
        catalog: Any,
        patch_size: Sequence[int] | None = None,
        default_task: int | str = 0,
        **plan_overrides: Any,
    ) -> UniSegExportable:
        """Build from a :class:`TaskCatalog` (or catalog path / built-in name) like :meth:`UniSeg.from_catalog`.

        Args:
            catalog: the task catalog (3D tasks only).
            patch_size: replaces the plan's patch, default ``None``.
            default_task: task name or id used when ``forward`` gets no ``task_id``, default ``0``.
            plan_overrides: other plan fields.
        """
        catalog = TaskCatalog.resolve(catalog)
        net = UniSeg.from_catalog(catalog, patch_size=patch_size, **plan_overrides)
        return cls(net.plan, net.num_classes, net.backbone.in_channels, default_task=catalog[default_task].id)

    @classmethod
    def from_uniseg(cls, network: UniSeg, default_task: int = 0) -> UniSegExportable:
        """A copy of a trained ``network`` (same weights) with the export forward."""
        out = cls(network.plan, network.num_classes, network.backbone.in_channels, default_task=default_task)
        out.load_state_dict(network.state_dict())
        return out

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int | None = None) -> torch.Tensor:  # type: ignore
        """Logits of one task, padded to ``max(num_classes)`` channels.

        Args:
            x: ``(B, C, *spatial)`` with ``spatial`` the plan's patch (or divisible by the total stride).
            task_id: a task id (int or tensor with one value; a ``(B,)`` tensor must hold one id), default
                ``default_task``.

        Returns:
            ``(B, max(num_classes), *spatial)``; channels ``>= num_classes[task_id]`` hold the lowest float value.
        """
        if task_id is None:
            tid = torch.full((1,), self.default_task, dtype=torch.long, device=x.device)
        else:
            tid = torch.as_tensor(task_id, device=x.device).to(torch.long).reshape(-1)[:1]
        skips = self._encode(x)
        prompts = self.task_prompts(skips[-1])  # (B, T, *b)
        out = self.backbone.decode(skips, torch.index_select(prompts, 1, tid))
        if isinstance(out, list):  # deep supervision in training mode: export is for eval
            out = out[0]
        keep = torch.index_select(self.class_mask, 0, tid).reshape(1, -1, *([1] * (out.ndim - 2)))
        return out.masked_fill(~keep, torch.finfo(out.dtype).min)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``backbone.encode`` with the stem picked by a Python int (a traced shape is a tensor)."""
        bb = self.backbone
        c = int(x.shape[1])
        if str(c) not in bb.stems:
            raise ValueError(f"input has {c} channel(s); this network has stems for {list(bb.in_channels)}.")
        h = bb.stem_norm_act(bb.stems[str(c)](x))
        skips = []
        for stage in bb.encoder:
            h = stage(h)
            skips.append(h)
        return skips

    def example_inputs(self, channels: int | None = None, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, task_id)`` for tracing: a random patch ``(batch_size, channels, *patch)`` and ``tensor([t])``
        with ``t`` the first task taking ``channels`` inputs (default: the first stem's channel count)."""
        channels = int(self.backbone.in_channels[0] if channels is None else channels)
        device = self.prompt.device
        x = torch.rand(batch_size, channels, *self.plan.patch_size, device=device)
        return x, torch.tensor([self.default_task], dtype=torch.long, device=device)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: returns a :class:`ScriptableUniSeg` of per-stem traces."""
        return ScriptableUniSeg(self)


class _ByStem(nn.Module):
    def __init__(self, traced: Sequence[torch.jit.ScriptModule], channels: Sequence[int]) -> None:
        super().__init__()
        self.traced = nn.ModuleList(traced)
        self.channels: list[int] = [int(c) for c in channels]

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        i = 0
        for m in self.traced:
            if self.channels[i] == c:
                return m(x, task_id)
            i += 1
        raise ValueError("input channel count does not match any stem of the network")


class ScriptableUniSeg(nn.Module):
    """What ``torch.jit.script(UniSegExportable)`` compiles: one ``torch.jit.trace`` per input stem.

    ``forward(x, task_id=None)``: ``x`` ``(B, C, *patch)`` with ``C`` one of the network's stems, ``task_id`` a
    ``(1,)`` long tensor (default the network's ``default_task``); returns ``(B, max(num_classes), *patch)`` as
    :meth:`UniSegExportable.forward`. Traced at the plan's patch size in eval mode (the shape sliding-window
    inference feeds).

    Args:
        network: the network to export (moved to eval mode).
    """

    def __init__(self, network: UniSegExportable) -> None:
        super().__init__()
        network = network.eval()
        self.default_task = int(network.default_task)
        traced = []
        with torch.no_grad(), warnings.catch_warnings():
            # shape checks of the backbone run as Python bools in the trace: constant for a fixed patch, as intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for c in network.backbone.in_channels:
                x, tid = network.example_inputs(channels=c)
                traced.append(torch.jit.trace(_TwoInputs(network), (x, tid), check_trace=False))
        self.stems = _ByStem(traced, network.backbone.in_channels)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if task_id is None:
            task_id = torch.full([1], self.default_task, dtype=torch.long, device=x.device)
        return self.stems(x, task_id)


class _TwoInputs(nn.Module):
    """Trace target: ``forward(x, task_id)`` with both arguments required."""

    def __init__(self, network: UniSegExportable) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        return self.network(x, task_id)


class MedUniSegExportable(nn.Module):
    """A traceable :class:`MedUniSeg` or :class:`MedUniSegStar` taking the task id as a tensor.

    As :class:`UniSegExportable`: the modal prompt mix and the task prior are picked with ``index_select`` on the
    ``task_id`` tensor, the output has ``max(num_classes)`` channels with those beyond the task's classes at the
    lowest float value. For MedUniSeg* every relearned task's adapters run and their residual branch is
    multiplied by 1 for the requested task and 0 for the others, so relearned and other tasks give the eager
    outputs. The input rank (2D or 3D) and the stem are fixed per trace (see :class:`ScriptableMedUniSeg`).

    Args:
        network: the trained MedUniSeg or MedUniSeg* (put in eval mode; weights shared, not copied).
        default_task: task used when ``forward`` gets no ``task_id``, default ``0``.
        patches: the patch of every task in task-id order (``catalog[t].patch_size``), used for the example
            inputs of the traces; default the plan's patch (its in-plane part for 2D tasks).
    """

    def __init__(
        self,
        network: MedUniSeg | MedUniSegStar,
        default_task: int = 0,
        patches: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, (MedUniSeg, MedUniSegStar)):
            raise ValueError(f"expected a MedUniSeg or MedUniSegStar to export, got {type(network).__name__}.")
        self.network = network.eval()
        base = network.base if isinstance(network, MedUniSegStar) else network
        if not 0 <= int(default_task) < base.num_tasks:
            raise ValueError(f"default_task must be a task id in [0, {base.num_tasks}), got {default_task}.")
        self.default_task = int(default_task)
        if patches is None:
            plan_patch = tuple(base.plan.patch_size)
            patches = [plan_patch if d == len(plan_patch) else plan_patch[:d] for d in base.task_dims]
        if len(patches) != base.num_tasks:
            raise ValueError(f"patches needs one patch per task ({base.num_tasks}), got {len(patches)}.")
        self.patches = [tuple(int(v) for v in p) for p in patches]
        mask = torch.zeros(base.num_tasks, max(base.num_classes), dtype=torch.bool)
        for t, k in enumerate(base.num_classes):
            mask[t, :k] = True
        self.register_buffer("class_mask", mask, persistent=False)
        self.relearned = list(getattr(network, "relearn_tasks", []))
        sel = torch.zeros(base.num_tasks, max(1, len(self.relearned)))
        for r, t in enumerate(self.relearned):
            sel[t, r] = 1.0
        self.register_buffer("relearn_select", sel, persistent=False)
        if base.plan.spatial_dims == 3 and 2 in base.task_dims:
            self.twin = self._build_twin()

    @property
    def base(self) -> MedUniSeg:
        return self.network.base if isinstance(self.network, MedUniSegStar) else self.network

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits ``(B, max(num_classes), *spatial)`` of one task for a 2D ``(B, C, X, Y)`` or 3D input."""
        if task_id is None:
            tid = torch.full((1,), self.default_task, dtype=torch.long, device=x.device)
        else:
            tid = torch.as_tensor(task_id, device=x.device).to(torch.long).reshape(-1)[:1]
        base = self.base
        if base.runs_2d_on_twin(x):
            return self.twin(x, tid)
        skips, modal = base.encode(x, tid)
        prompt = torch.index_select(base.task_prompts(skips[-1], modal), 1, tid)
        hook = None
        if self.relearned:
            sel = torch.index_select(self.relearn_select, 0, tid).reshape(-1)
            adapters = [self.network.adapters[str(t)] for t in self.relearned]

            def hook(s: int, h: torch.Tensor) -> torch.Tensor:
                for r, mods in enumerate(adapters):
                    h = h + sel[r] * mods[s].delta(h)
                return h

        out = base.backbone.decode(skips, prompt, hook=hook)
        if isinstance(out, list):
            out = out[0]
        keep = torch.index_select(self.class_mask, 0, tid).reshape(1, -1, *([1] * (out.ndim - 2)))
        return out.masked_fill(~keep, torch.finfo(out.dtype).min)

    def _build_twin(self) -> MedUniSegExportable:
        """A 2D twin holding copies of the 2D views of the weights (``functional_call``, which the eager network
        uses, cannot run inside ``torch.jit.trace``; the values are the same)."""
        meta = MedUniSegExportable(self.network.flat_twin(), self.default_task, self.patches)
        twin = MedUniSegExportable(type(self.network).from_config(meta.network.config), self.default_task, self.patches)
        keys = set(twin.state_dict())
        twin.load_state_dict({k: v.detach().clone() for k, v in twin_tensors(self, meta).items() if k in keys})
        return twin.to(self.class_mask.device).eval()

    def input_kinds(self) -> list[tuple[int, tuple[int, ...], int]]:
        """``(channels, patch, example task)`` for every distinct input kind of the tasks (one trace each)."""
        kinds: dict[tuple[int, tuple[int, ...]], int] = {}
        for t in range(self.base.num_tasks):
            kinds.setdefault((len(self.base.task_modalities[t]), self.patches[t]), t)
        return [(c, p, t) for (c, p), t in kinds.items()]

    def example_inputs(self, task: int | None = None, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, task_id)`` for tracing: a random patch of ``task`` (default ``default_task``) and ``tensor([task])``."""
        task = self.default_task if task is None else int(task)
        base = self.base
        c = len(base.task_modalities[task])
        patch = self.patches[task]
        device = base.prompt.device
        x = torch.rand(batch_size, c, *patch, device=device)
        return x, torch.tensor([task], dtype=torch.long, device=device)


class ScriptableMedUniSeg(nn.Module):
    """TorchScript form of a MedUniSeg / MedUniSeg*: one ``torch.jit.trace`` per input kind (channel count and
    patch, so 2D and 3D tasks each get theirs), dispatched on the input's channels and spatial size.

    ``forward(x, task_id=None)``: ``x`` ``(B, C, *patch)`` with ``patch`` the patch of a task taking ``C``
    channels (sliding-window inference with each task's patch feeds exactly these), ``task_id`` a ``(1,)`` long
    tensor (default the network's default task); returns :meth:`MedUniSegExportable.forward`'s logits.

    Args:
        network: the exportable network (its ``patches`` fix the traced input sizes).
    """

    def __init__(self, network: MedUniSegExportable) -> None:
        super().__init__()
        network = network.eval()
        self.default_task = int(network.default_task)
        kinds = network.input_kinds()
        traced = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for _, _, task in kinds:
                traced.append(torch.jit.trace(_TwoInputs(network), network.example_inputs(task), check_trace=False))
        self.traced = nn.ModuleList(traced)
        self.channels: list[int] = [c for c, _, _ in kinds]
        self.patches: list[list[int]] = [list(p) for _, p, _ in kinds]

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if task_id is None:
            task_id = torch.full([1], self.default_task, dtype=torch.long, device=x.device)
        size = x.shape[2:]
        i = 0
        for m in self.traced:
            if self.channels[i] == x.shape[1] and self.patches[i] == size:
                return m(x, task_id)
            i += 1
        raise ValueError("input channel count and spatial size do not match the patch of any task of the network")


def hermes_example_inputs(
    network: Hermes, channels: int | None = None, task: int | None = None, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, task_ids, modality_id)`` to trace a :class:`Hermes`: a random patch ``(batch_size, C, *patch)`` and
    the request ``(1, n)`` / ``(1,)`` of ``task`` (default: the first task taking ``channels`` inputs; default
    channels: the first stem's)."""
    channels = int(network.backbone.in_channels[0] if channels is None else channels)
    if task is None:
        task = next(
            (
                i
                for i, t in enumerate(network.tasks)
                if len(network.modality_names[t["modality"]].split("+")) == channels
            ),
            0,
        )
    ids, mod = network.request([int(task)])
    x = torch.rand(batch_size, channels, *network.plan.patch_size, device=ids.device)
    return x, ids, mod


class _HermesInputs(nn.Module):
    """Trace target: ``forward(x, task_ids, modality_id)`` with every argument required (eval: logits)."""

    def __init__(self, network: Hermes) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        return self.network(x, task_ids, modality_id)


class _HermesByStem(nn.Module):
    def __init__(self, traced: Sequence[torch.jit.ScriptModule], channels: Sequence[int]) -> None:
        super().__init__()
        self.traced = nn.ModuleList(traced)
        self.channels: list[int] = [int(c) for c in channels]

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        i = 0
        for m in self.traced:
            if self.channels[i] == c:
                return m(x, task_ids, modality_id)
            i += 1
        raise ValueError("input channel count does not match any stem of the network")


class ScriptableHermes(nn.Module):
    """TorchScript form of a :class:`Hermes`: one ``torch.jit.trace`` per input stem, dispatched by channel count.

    ``forward(x, task_ids, modality_id)``: ``x`` ``(B, C, *patch)``, ``task_ids`` ``(1, n)`` or ``(B, n)`` long
    global target ids (``-1`` padding), ``modality_id`` ``(1,)`` or ``(B,)``; returns the eval logits
    ``(B, n, *patch)`` as the eager network. Traced at the plan's patch in eval mode; the request's length ``n``
    may differ from the traced one. The input checks of the eager network are not part of the trace.

    Args:
        network: the Hermes to export (moved to eval mode).
    """

    def __init__(self, network: Hermes) -> None:
        super().__init__()
        network = network.eval()
        traced = []
        with torch.no_grad(), warnings.catch_warnings():
            # shape and request checks run as Python bools in the trace: constant for a valid request, as intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for c in network.backbone.in_channels:
                traced.append(
                    torch.jit.trace(_HermesInputs(network), hermes_example_inputs(network, c), check_trace=False)
                )
        self.stems = _HermesByStem(traced, network.backbone.in_channels)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        return self.stems(x, task_ids, modality_id)


def _as_exportable(network: nn.Module, default_task: int | None = None) -> UniSegExportable:
    network = network.module if hasattr(network, "module") else network
    if isinstance(network, UniSegExportable):
        if default_task is not None and int(default_task) != network.default_task:
            network = UniSegExportable.from_uniseg(network, int(default_task))
        return network.eval()
    if not isinstance(network, UniSeg):
        raise ValueError(f"expected a UniSeg network to export, got {type(network).__name__}.")
    return UniSegExportable.from_uniseg(network, 0 if default_task is None else int(default_task)).eval()


def export_torchscript(
    network: nn.Module,
    filepath: str | os.PathLike | None = None,
    default_task: int | None = None,
    extra_files: Mapping[str, Any] | None = None,
    patches: Sequence[Sequence[int]] | None = None,
) -> torch.jit.ScriptModule:
    """TorchScript of a UniSeg (``UniSeg`` or ``UniSegExportable``) taking ``(x, task_id)``; saved if ``filepath``.

    A :class:`Hermes` gives a :class:`ScriptableHermes` taking ``(x, task_ids, modality_id)`` (``default_task`` is
    not used).

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is unwrapped).
        filepath: ``.ts`` file to write, default ``None`` (not saved).
        default_task: task used when ``task_id`` is not given, default the network's (or ``0``).
        extra_files: name -> str/bytes/JSON-able object embedded as TorchScript extra files (e.g.
            ``{"metadata.json": meta}``), default none.
        patches: MedUniSeg only: each task's patch (``catalog[t].patch_size``), the input sizes traced, default
            the plan's patch (its in-plane part for 2D tasks).
    """
    unwrapped = network.module if hasattr(network, "module") else network
    if isinstance(unwrapped, Hermes):  # Hermes: (x, task_ids, modality_id), one trace per stem
        with torch.no_grad():
            ts = torch.jit.script(ScriptableHermes(unwrapped))
    elif isinstance(unwrapped, (MedUniSeg, MedUniSegStar)):  # one trace per channel count and task patch
        exportable = MedUniSegExportable(unwrapped, 0 if default_task is None else int(default_task), patches)
        with torch.no_grad():
            ts = torch.jit.script(ScriptableMedUniSeg(exportable))
    else:
        net = _as_exportable(network, default_task)
        with torch.no_grad():
            ts = torch.jit.script(net)
    if filepath is not None:
        files = {}
        for name, value in (extra_files or {}).items():
            files[name] = value if isinstance(value, (bytes, str)) else json.dumps(value)
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(ts, str(filepath), _extra_files=files)
    return ts


def export_onnx(
    network: nn.Module,
    filepath: str | os.PathLike,
    channels: int | None = None,
    default_task: int | None = None,
    opset_version: int = 18,
    patches: Sequence[Sequence[int]] | None = None,
) -> Path:
    """ONNX model with inputs ``image`` ``(B, C, *patch)`` and ``task_id`` ``(1,)`` int64 and output ``pred``
    ``(B, max(num_classes), *patch)`` (dynamic batch), for one input channel count ``channels`` (default the first
    stem's; export once per channel count for multi-modal catalogs). A :class:`Hermes` gets the inputs ``image``,
    ``task_ids`` ``(1, n)`` int64 (dynamic ``n``) and ``modality_id`` ``(1,)`` int64 and the output ``pred``
    ``(B, n, *patch)``; its example request is ``default_task``'s targets.

    Args:
        network: the trained network.
        filepath: ``.onnx`` file to write.
        channels: input channels of the exported graph, default the first stem's.
        default_task: task of the example input (any task with ``channels`` inputs), default the network's.
        opset_version: ONNX opset, default 18.
        patches: MedUniSeg only: each task's patch; the graph takes ``default_task``'s patch and rank (export
            once per channel count and patch, as :func:`export_checkpoint` does).
    """
    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    unwrapped = network.module if hasattr(network, "module") else network
    if isinstance(unwrapped, Hermes):  # inputs image, task_ids (1, n), modality_id (1,)
        was_training = unwrapped.training
        hermes = unwrapped.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                _HermesInputs(hermes).eval(),
                hermes_example_inputs(hermes, channels, default_task),
                str(filepath),
                input_names=["image", "task_ids", "modality_id"],
                output_names=["pred"],
                opset_version=opset_version,
                dynamo=False,
                dynamic_axes={"image": {0: "batch"}, "task_ids": {1: "targets"}, "pred": {0: "batch", 1: "targets"}},
            )
        unwrapped.train(was_training)
        return filepath
    if isinstance(unwrapped, (MedUniSeg, MedUniSegStar)):
        net = MedUniSegExportable(unwrapped, 0 if default_task is None else int(default_task), patches)
        x, tid = net.example_inputs()
    else:
        net = _as_exportable(network, default_task)
        x, tid = net.example_inputs(channels=channels)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _TwoInputs(net),
            (x, tid),
            str(filepath),
            input_names=["image", "task_id"],
            output_names=["pred"],
            opset_version=opset_version,
            dynamo=False,
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
        )
    return filepath


def export_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("torchscript", "onnx"),
    catalog: TaskCatalog | str | None = None,
) -> dict[str, Path]:
    """Export a training checkpoint (``{"model", "meta"}``) to ``model.ts`` and/or ``model_c<C>.onnx`` files.

    Args:
        ckpt: checkpoint written by training (``engines.save_checkpoint`` or the bundle's ``models/model.pt``).
        out_dir: output folder.
        formats: any of ``"torchscript"``, ``"onnx"``, default both.
        catalog: overrides the catalog stored in the checkpoint, default ``None``.

    Returns:
        format (``"torchscript"`` or ``"onnx_c<C>"``) -> written path.
    """
    from .engines import load_checkpoint

    unknown = set(formats) - {"torchscript", "onnx"}
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; expected 'torchscript' and/or 'onnx'.")
    net, cat = load_checkpoint(ckpt, catalog=catalog)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    med = isinstance(net, (MedUniSeg, MedUniSegStar))
    patches = [t.patch_size for t in cat] if med else None
    if "torchscript" in formats:
        path = out_dir / "model.ts"
        export_torchscript(
            net, path, extra_files={"catalog.json": cat.to_dict(), "network.json": net.config}, patches=patches
        )
        written["torchscript"] = path
    if "onnx" in formats and med:  # one graph per channel count and task patch (2D and 3D tasks)
        for c, patch, task in MedUniSegExportable(net, 0, patches).input_kinds():
            name = f"onnx_c{c}_{'x'.join(map(str, patch))}"
            written[name] = export_onnx(
                net, out_dir / f"model_c{c}_{'x'.join(map(str, patch))}.onnx", default_task=task, patches=patches
            )
    elif "onnx" in formats:
        for c in net.backbone.in_channels:
            task = next(t for t in cat if t.num_channels == c)
            written[f"onnx_c{c}"] = export_onnx(net, out_dir / f"model_c{c}.onnx", channels=c, default_task=task.id)
    return written

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript and ONNX form of MedUniSeg and MedUniSeg* with the task id as a model input: one trace per input kind
(channel count and patch), so 2D and 3D tasks each get theirs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...export import TaskInputs, TracedByInput, class_mask, mask_classes, task_tensor, trace
from .network import MedUniSeg, twin_tensors
from .star import MedUniSegStar

__all__ = ["MedUniSegExportable", "scriptable_meduniseg"]


class MedUniSegExportable(nn.Module):
    """A traceable :class:`MedUniSeg` or :class:`MedUniSegStar` taking the task id as a tensor.

    As :class:`UniSegExportable`: the modal prompt mix and the task prior are picked with ``index_select`` on the
    ``task_id`` tensor, the output has ``max(num_classes)`` channels with those beyond the task's classes at the
    lowest float value. For MedUniSeg* every relearned task's adapters run and their residual branch is
    multiplied by 1 for the requested task and 0 for the others, so relearned and other tasks give the eager
    outputs. The input rank (2D or 3D) and the stem are fixed per trace (see :func:`scriptable_meduniseg`).

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
        self.register_buffer("class_mask", class_mask(base.num_classes), persistent=False)
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
        tid = task_tensor(task_id, self.default_task, x.device)
        base = self.base
        if base.runs_2d_on_twin(x):
            return self.twin(x, tid)
        skips, modal = base.encode(x, tid)
        prompt = torch.index_select(base.task_prompts(skips[-1], modal), 1, tid)
        hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        if self.relearned:
            sel = torch.index_select(self.relearn_select, 0, tid).reshape(-1)
            adapters = [self.network.adapters[str(t)] for t in self.relearned]

            def adapter_hook(s: int, h: torch.Tensor) -> torch.Tensor:
                for r, mods in enumerate(adapters):
                    h = h + sel[r] * mods[s].delta(h)
                return h

            hook = adapter_hook

        out = base.backbone.decode(skips, prompt, hook=hook)
        if isinstance(out, list):
            out = out[0]
        return mask_classes(out, self.class_mask, tid)

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
        """``(x, task_id)`` for tracing: a random patch of ``task`` (default ``default_task``), ``tensor([task])``."""
        task = self.default_task if task is None else int(task)
        base = self.base
        c = len(base.task_modalities[task])
        patch = self.patches[task]
        device = base.prompt.device
        x = torch.rand(batch_size, c, *patch, device=device)
        return x, torch.tensor([task], dtype=torch.long, device=device)


def scriptable_meduniseg(network: MedUniSegExportable) -> TracedByInput:
    """TorchScript form of a MedUniSeg / MedUniSeg*: one ``torch.jit.trace`` per input kind (channel count and
    patch), dispatched on the input's channels and spatial size.

    The result's ``forward(x, task_id=None)`` takes ``x`` ``(B, C, *patch)`` with ``patch`` the patch of a task
    taking ``C`` channels (sliding-window inference with each task's patch feeds exactly these) and ``task_id`` a
    ``(1,)`` long tensor (default the network's default task), and returns :meth:`MedUniSegExportable.forward`'s
    logits.
    """
    network = network.eval()
    kinds = network.input_kinds()
    traced = [trace(TaskInputs(network), network.example_inputs(task)) for _, _, task in kinds]
    return TracedByInput(traced, [c for c, _, _ in kinds], [p for _, p, _ in kinds], network.default_task)

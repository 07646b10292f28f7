# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript and ONNX form of UniSeg with the task id as a model input.

:class:`UniSeg`'s eager ``forward(x, task_id)`` picks the task with Python logic (an ``int``), slices the output
to the task's classes and selects the input stem by channel count, none of which survives ``torch.jit.trace``.
:class:`UniSegExportable` is a drop-in subclass (identical state-dict keys, so any UniSeg checkpoint loads into it)
whose forward is traceable with the task as a tensor:

* the task prompt is picked with ``index_select`` on a ``task_id`` tensor (so one traced graph serves every task);
* the output always has ``max(num_classes)`` channels; channels beyond the task's classes are filled with the
  lowest float value (:func:`uniseg_components.export.mask_classes`), so ``softmax`` / ``argmax`` equal those of
  the eager output, and ``out[:, :K_task]`` equals it;
* ``task_id=None`` uses ``default_task`` (what MONAI's one-input ``ckpt_export`` / ``onnx_export`` trace or check
  with).

``torch.jit.script`` of it (MONAI's ``ckpt_export`` without ``--use_trace``) goes through ``__prepare_scriptable__``:
one trace per input channel count, dispatched by :class:`~uniseg_components.export.TracedByInput`, so the TorchScript
model takes ``(x, task_id)`` for every task and every stem.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks import eval_mode
from torch import nn

from ...export import TaskInputs, TracedByInput, class_mask, mask_classes, task_tensor, trace
from ...networks.plans import UNetPlan
from .network import UniSeg

__all__ = ["UniSegExportable", "scriptable_uniseg"]


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
        self.bind_task(default_task)
        # not persistent: the state dict keeps exactly UniSeg's keys
        self.register_buffer("class_mask", class_mask(self.num_classes), persistent=False)

    @classmethod
    def from_uniseg(cls, network: UniSeg, default_task: int = 0) -> UniSegExportable:
        """A copy of a trained ``network`` (same weights) with the export forward."""
        out = cls(network.plan, network.num_classes, network.backbone.in_channels, default_task=default_task)
        out.load_state_dict(network.state_dict())
        return out.to(network.prompt.device)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int | None = None) -> torch.Tensor:  # type: ignore
        """Logits of one task, padded to ``max(num_classes)`` channels.

        Args:
            x: ``(B, C, *spatial)`` with ``spatial`` the plan's patch (or divisible by the total stride).
            task_id: a task id (int or tensor with one value; a ``(B,)`` tensor must hold one id), default
                ``default_task``.

        Returns:
            ``(B, max(num_classes), *spatial)``; channels ``>= num_classes[task_id]`` hold the lowest float value.
        """
        tid = task_tensor(task_id, self.default_task, x.device)
        skips = self._encode(x)
        prompts = self.task_prompts(skips[-1])  # (B, T, *b)
        out = self.backbone.decode(skips, torch.index_select(prompts, 1, tid))
        if isinstance(out, list):  # deep supervision in training mode: export is for eval
            out = out[0]
        return mask_classes(out, self.class_mask, tid)

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
        with ``t`` the default task (default channels: the first stem's channel count)."""
        channels = int(self.backbone.in_channels[0] if channels is None else channels)
        device = self.prompt.device
        x = torch.rand(batch_size, channels, *self.plan.patch_size, device=device)
        return x, torch.tensor([self.default_task], dtype=torch.long, device=device)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: one trace per input stem (see :func:`scriptable_uniseg`)."""
        with eval_mode(self):  # the training mode is restored afterwards
            return scriptable_uniseg(self)


def scriptable_uniseg(network: UniSegExportable) -> TracedByInput:
    """What ``torch.jit.script(UniSegExportable)`` compiles: one ``torch.jit.trace`` per input stem at the plan's
    patch in eval mode (the shape sliding-window inference feeds), taking ``(x, task_id=None)`` and returning
    ``(B, max(num_classes), *patch)`` as :meth:`UniSegExportable.forward`."""
    network = network.eval()
    channels = network.backbone.in_channels
    traced = [trace(TaskInputs(network), network.example_inputs(channels=c)) for c in channels]
    return TracedByInput(traced, channels, default_task=network.default_task)

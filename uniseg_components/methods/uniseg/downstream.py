# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg's downstream model: the upstream backbone without the prompt, for fine-tuning on one new task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks import eval_mode
from torch import nn

from ...export import trace
from ...networks.backbone import UNetBackbone
from ...networks.blocks import task_index
from ...networks.plans import UNetPlan, plan_from_catalog

__all__ = ["UniSegDownstream"]


class UniSegDownstream(nn.Module):
    """The network UniSeg fine-tunes on a downstream task: the same stems, encoder and decoder as :class:`UniSeg`,
    without the universal prompt, the FUSE module and the prompt concatenation.

    The first transposed convolution therefore takes ``features[-1]`` input channels (``features[-1] + 1`` in the
    upstream model), and the heads have ``num_classes`` outputs for the new task (any number >= 2).
    :func:`uniseg_components.finetune.load_upstream_weights` copies the upstream weights into it.

    Args:
        plan: the backbone plan; must equal the upstream plan for the weights to transfer.
        num_classes: classes of the task, background included (>= 2).
        in_channels: input channel counts to build stems for, default ``(1,)``.

    Shapes:
        ``forward(x, task_id=None)``: ``x`` is ``(B, C, *spatial)`` with ``C`` in ``in_channels`` and ``spatial``
        divisible by ``plan.total_stride``; returns ``(B, num_classes, *spatial)`` logits in eval mode, and in
        training mode with deep supervision a list of logits per decoder stage, highest resolution first.

    Example::

        catalog = TaskCatalog.builtin("demo").select(names=["abdomen_ct"])
        net = UniSegDownstream.from_catalog(catalog).eval()
        net(torch.zeros(1, 1, 48, 48, 48)).shape  # (1, 3, 48, 48, 48)
    """

    def __init__(self, plan: UNetPlan, num_classes: int, in_channels: Sequence[int] = (1,)) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}.")
        self.plan = plan
        self.num_classes = int(num_classes)
        self.num_tasks = 1
        self.backbone = UNetBackbone(plan, in_channels, self.num_classes, decoder_extra_channels=0)

    @classmethod
    def from_catalog(
        cls, catalog: Any, patch_size: Sequence[int] | None = None, **plan_overrides: Any
    ) -> UniSegDownstream:
        """Build the downstream network for a single-task :class:`~uniseg_components.tasks.TaskCatalog`.

        Args:
            catalog: a catalog with exactly one 3D task (e.g. ``TaskCatalog.builtin("demo").select(names=[...])``).
            patch_size: replaces the plan's training patch, default ``None`` (the catalog plan's).
            plan_overrides: other plan fields to replace (``features``, ``deep_supervision``...).

        Raises:
            ValueError: the catalog has several tasks or a 2D task.
        """
        if len(catalog) != 1:
            raise ValueError(
                f"the downstream network is trained on one task, but catalog {catalog.name!r} has {len(catalog)} "
                f"tasks {catalog.names}; use catalog.select(names=[task])."
            )
        task = catalog[0]
        if task.dims != 3:
            raise ValueError(f"UniSegDownstream is a 3D model but task {task.name!r} is {task.dims}D.")
        plan = plan_from_catalog(catalog, patch_size=patch_size, **plan_overrides)
        return cls(plan, task.num_classes, catalog.channel_counts)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network (stored in checkpoints, see :meth:`from_config`)."""
        return {
            "name": type(self).__name__,
            "plan": self.plan.to_dict(),
            "num_classes": self.num_classes,
            "in_channels": list(self.backbone.in_channels),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UniSegDownstream:
        """Rebuild a network from :attr:`config`."""
        num_classes = config["num_classes"]
        if isinstance(num_classes, (list, tuple)):
            if len(num_classes) != 1:
                raise ValueError(f"UniSegDownstream has one task, got num_classes {num_classes}.")
            num_classes = num_classes[0]
        return cls(UNetPlan.from_dict(config["plan"]), int(num_classes), config["in_channels"])

    def forward(self, x: torch.Tensor, task_id: int | torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, C, *spatial)``.
            task_id: accepted so that the task-aware engines and inferers work unchanged; must be ``None`` or 0
                (the only task), default ``None``.

        Returns:
            logits ``(B, num_classes, *spatial)`` (a list per decoder stage in training with deep supervision).
        """
        if task_id is not None and not torch.jit.is_tracing():
            task_index(task_id, 1, x.shape[0])
        return self.backbone.decode(self._encode(x))

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``backbone.encode`` with the stem picked by a Python int (under ``torch.jit.trace`` a shape is a
        tensor, and the stems are keyed by strings)."""
        bb = self.backbone
        bb.check_input(x)
        h = bb.stem_norm_act(bb.stems[str(int(x.shape[1]))](x))
        skips = []
        for stage in bb.encoder:
            h = stage(h)
            skips.append(h)
        return skips

    def example_input(self, channels: int | None = None, batch_size: int = 1) -> torch.Tensor:
        """A zero input ``(batch_size, channels, *plan.patch_size)``; ``channels`` defaults to the first stem's."""
        c = self.backbone.in_channels[0] if channels is None else int(channels)
        return torch.zeros(batch_size, c, *self.plan.patch_size)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` (MONAI's ``ckpt_export`` without ``--use_trace``): the eval-mode network
        traced with one input of the first stem's channel count (the downstream task's), which is what a
        single-task model needs; the result takes ``x`` only and returns the logits ``(B, num_classes, *spatial)``.
        """
        if len(self.backbone.in_channels) != 1:
            raise ValueError(
                f"scripting needs a single input stem, this network has stems for {list(self.backbone.in_channels)} "
                "channels; use torch.jit.trace with an input of the wanted channel count."
            )
        with eval_mode(self):  # the training mode is restored afterwards
            return _TracedDownstream(trace(_ImageOnly(self), (self.example_input(),)))


class _TracedDownstream(nn.Module):
    """What ``torch.jit.script`` compiles for :class:`UniSegDownstream`: a holder of its trace."""

    def __init__(self, traced: nn.Module) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


class _ImageOnly(nn.Module):
    """``network(x)`` only, so that the trace has one input."""

    def __init__(self, network: UniSegDownstream) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # type: ignore[return-value]

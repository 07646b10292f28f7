# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg: a prompt-driven universal segmentation network (Ye et al., MICCAI 2023, arXiv 2304.03493)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...networks.backbone import UNetBackbone
from ...networks.blocks import DefaultTask, FusePromptModule, init_he, task_index
from ...networks.plans import UNetPlan, plan_from_catalog
from ...tasks import TaskCatalog

__all__ = ["UniSeg"]


class UniSeg(DefaultTask, nn.Module):
    """UniSeg: a plan-driven U-Net whose decoder is driven by a task-specific prompt.

    A learnable *universal prompt* of shape ``(1, T, *bottleneck)`` is concatenated with the bottleneck features
    and passed through :class:`FusePromptModule`; the output channel of the current task is the task-specific
    prompt, concatenated to the bottleneck features at the decoder input (the first transposed convolution
    therefore has ``features[-1] + 1`` input channels). The segmentation heads are shared with
    ``max(num_classes)`` outputs and sliced to the task's own ``num_classes[task]`` channels, so a softmax runs
    over that task's classes only.

    The prompt's spatial size equals the bottleneck size of the training patch (``patch_size / total_stride``).
    Inputs of another size that is divisible by the total stride are accepted: the prompt is resized
    (trilinear) to their bottleneck. A size that is not divisible raises ``ValueError``.

    Args:
        plan: the backbone plan (patch, features, kernels, strides...).
        num_classes: classes of each task, background included, in task-id order, e.g. ``[3, 3, 2, 4]``.
        in_channels: input channel counts to build stems for, default ``(1,)``.

    Shapes:
        ``forward(x, task_id)``: ``x`` is ``(B, C, *spatial)``; returns ``(B, num_classes[task_id], *spatial)``
        logits in eval mode; in training mode with deep supervision a list of such logits, one per decoder stage,
        highest resolution first. ``forward(x)`` segments :attr:`default_task`.

    Example::

        catalog = TaskCatalog.builtin("uniseg_11tasks")
        net = UniSeg.from_catalog(catalog)            # 32.1 M parameters, prompt (1, 11, 6, 6, 4)
        net.eval()(torch.zeros(1, 4, 192, 192, 64), task_id=9).shape  # (1, 4, 192, 192, 64): BraTS
    """

    def __init__(self, plan: UNetPlan, num_classes: Sequence[int], in_channels: Sequence[int] = (1,)) -> None:
        super().__init__()
        if not num_classes or any(int(k) < 2 for k in num_classes):
            raise ValueError(f"num_classes needs one entry >= 2 per task (background + foreground), got {num_classes}.")
        self.plan = plan
        self.num_classes = [int(k) for k in num_classes]
        self.num_tasks = len(self.num_classes)
        self.backbone = UNetBackbone(plan, in_channels, max(self.num_classes), decoder_extra_channels=1)
        self.prompt = nn.Parameter(torch.randn(1, self.num_tasks, *plan.bottleneck_size()))
        self.fuse = FusePromptModule(plan.spatial_dims, plan.features[-1], self.num_tasks)
        self.fuse.apply(init_he)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_catalog(
        cls,
        catalog: Any,
        patch_size: Sequence[int] | None = None,
        default_task: int | str = 0,
        **plan_overrides: Any,
    ) -> UniSeg:
        """Build UniSeg for a :class:`~uniseg_components.tasks.TaskCatalog` with the catalog's plan.

        Args:
            catalog: the task catalog, a catalog JSON file or a built-in name (all tasks must be 3D: UniSeg is a
                3D model).
            patch_size: replaces the plan's training patch; the prompt follows it.
            default_task: name or id of the task ``forward(x)`` segments, default ``0``.
            plan_overrides: other plan fields to replace (``features``, ``deep_supervision``...).
        """
        catalog = TaskCatalog.resolve(catalog)
        two_d = [t.name for t in catalog if t.dims != 3]
        if two_d:
            raise ValueError(
                f"UniSeg is a 3D model but catalog {catalog.name!r} has 2D task(s) {two_d}; use "
                f"catalog.select(dims=3) or MedUniSeg for 2D tasks."
            )
        plan = plan_from_catalog(catalog, patch_size=patch_size, **plan_overrides)
        return cls(plan, catalog.num_classes, catalog.channel_counts).bind_task(catalog[default_task].id)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network (stored in checkpoints, see :meth:`from_config`)."""
        return {
            "name": type(self).__name__,
            "plan": self.plan.to_dict(),
            "num_classes": list(self.num_classes),
            "in_channels": list(self.backbone.in_channels),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UniSeg:
        """Rebuild a network from :attr:`config`."""
        return cls(UNetPlan.from_dict(config["plan"]), config["num_classes"], config["in_channels"])

    # ------------------------------------------------------------------ forward
    def task_prompts(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """All task-specific prompts for bottleneck features ``(B, C, *b)``: returns ``(B, T, *b)``."""
        prompt = self.prompt
        if tuple(prompt.shape[2:]) != tuple(bottleneck.shape[2:]):
            mode = "trilinear" if self.plan.spatial_dims == 3 else "bilinear"
            prompt = F.interpolate(prompt, size=bottleneck.shape[2:], mode=mode, align_corners=False)
        prompt = prompt.expand(bottleneck.shape[0], *prompt.shape[1:])
        return self.fuse(torch.cat([bottleneck, prompt], dim=1))

    def forward(self, x: torch.Tensor, task_id: int | torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` for one task.

        Args:
            x: ``(B, C, *spatial)``, ``C`` one of the stems' channel counts, ``spatial`` divisible by the total
                stride.
            task_id: an int, or a tensor of per-sample ids that must all be equal; default :attr:`default_task`.

        Returns:
            logits ``(B, num_classes[task_id], *spatial)`` (a list per decoder stage in training with deep
            supervision).
        """
        task = task_index(self.default_task if task_id is None else task_id, self.num_tasks, x.shape[0])
        skips = self.backbone.encode(x)
        prompts = self.task_prompts(skips[-1])
        return self.backbone.decode(skips, prompts[:, task : task + 1], head_channels=self.num_classes[task])

    def forward_all_tasks(
        self, x: torch.Tensor, task_ids: Sequence[int] | None = None
    ) -> list[torch.Tensor | list[torch.Tensor]]:
        """Segment ``x`` for several tasks with one encoder pass and one decoder pass per task.

        The encoder and FUSE run once; the decoder runs for every requested task. The outputs equal separate
        :meth:`forward` calls (InstanceNorm normalises every sample on its own).

        Args:
            x: ``(B, C, *spatial)``.
            task_ids: tasks to segment, default all ``range(num_tasks)``.

        Returns:
            one output per task in ``task_ids`` order, each as :meth:`forward` would return it.
        """
        ids = list(range(self.num_tasks)) if task_ids is None else [task_index(t, self.num_tasks) for t in task_ids]
        skips = self.backbone.encode(x)
        prompts = self.task_prompts(skips[-1])
        return [self.backbone.decode(skips, prompts[:, t : t + 1], head_channels=self.num_classes[t]) for t in ids]

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` (MONAI's ``ckpt_export network_def``): the TorchScript form of
        :class:`~uniseg_components.methods.uniseg.UniSegExportable` with the same weights, one trace per input stem,
        taking ``(x, task_id=None)`` (``None``: :attr:`default_task`) and returning ``(B, max(num_classes),
        *patch)`` logits (channels beyond the task's classes at the lowest float value)."""
        from .export import UniSegExportable

        return UniSegExportable.from_uniseg(self, self.default_task).__prepare_scriptable__()

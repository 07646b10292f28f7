# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg*: a trained MedUniSeg, frozen, plus new lightweight decoder adapters for the tasks it relearns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers import Conv
from torch import nn

from ...networks.backbone import UNetBackbone
from ...networks.blocks import DefaultTask, init_he, task_index
from ...networks.plans import UNetPlan
from .network import MedUniSeg, call_twin

__all__ = ["DecoderAdapter", "MedUniSegStar"]


class DecoderAdapter(nn.Module):
    """A residual bottleneck adapter for one decoder stage: ``h + up(act(conv(act(down(h)))))``.

    ``down`` is a 1x1 conv to ``channels // reduction`` channels, ``conv`` a 3x3 conv at that width, ``up`` a 1x1
    conv back, initialised to zero so that a new adapter leaves the features (and the model output) unchanged.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of the decoder stage.
        reduction: bottleneck reduction, default 4 (at least 4 channels are kept).
        negative_slope: LeakyReLU slope, default 0.01.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4, negative_slope: float = 0.01) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        hidden = max(4, channels // int(reduction))
        self.down = conv(channels, hidden, 1)
        self.conv = conv(hidden, hidden, 3, padding=1)
        self.up = conv(hidden, channels, 1)
        self.act = nn.LeakyReLU(negative_slope)
        init_he(self.down)
        init_he(self.conv)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch alone: ``forward(h) == h + delta(h)``."""
        return self.up(self.act(self.conv(self.act(self.down(h)))))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


class MedUniSegStar(DefaultTask, nn.Module):
    """MedUniSeg*: a trained :class:`MedUniSeg`, frozen, plus new lightweight modules for chosen tasks.

    Each relearned task gets one :class:`DecoderAdapter` per decoder stage (after the stage's convolutions,
    before its head). A relearned task is segmented by the frozen network with its adapters; every other task
    runs exactly :meth:`MedUniSeg.forward` of the frozen network, so its outputs are bitwise those of the
    original model. The adapters start at zero (the relearning starts from the original output). Train only
    :meth:`trainable_parameters` (the adapters) on the relearned tasks' data.

    Args:
        base: the trained MedUniSeg (its parameters are frozen: ``requires_grad=False``).
        tasks: ids of the tasks to relearn (at least one).
        reduction: adapter bottleneck reduction, default 4.

    Shapes: as :meth:`MedUniSeg.forward`.

    Example::

        star = MedUniSegStar(trained, tasks=[2])   # relearn task 2 only
        opt = torch.optim.SGD(star.trainable_parameters(), lr=1e-2)
    """

    def __init__(self, base: MedUniSeg, tasks: Sequence[int], reduction: int = 4) -> None:
        super().__init__()
        if not isinstance(base, MedUniSeg):
            raise ValueError(f"MedUniSegStar relearns tasks of a MedUniSeg, got {type(base).__name__}.")
        ids = sorted({task_index(t, base.num_tasks) for t in tasks})
        if not ids:
            raise ValueError("MedUniSegStar needs at least one task to relearn.")
        self.base = base
        self.base.requires_grad_(False)
        self.relearn_tasks = ids
        self.reduction = int(reduction)
        plan = base.plan
        n = plan.num_stages
        widths = [plan.features[n - 2 - s] for s in range(n - 1)]  # decoder stage s works at level n-2-s
        self.adapters = nn.ModuleDict(
            {
                str(t): nn.ModuleList(
                    DecoderAdapter(plan.spatial_dims, w, self.reduction, plan.negative_slope) for w in widths
                )
                for t in ids
            }
        )

    # mirror the attributes the pipeline reads from a network
    @property
    def plan(self) -> UNetPlan:
        return self.base.plan

    @property
    def num_tasks(self) -> int:
        return self.base.num_tasks

    @property
    def num_classes(self) -> list[int]:
        return self.base.num_classes

    @property
    def task_dims(self) -> list[int]:
        return self.base.task_dims

    @property
    def task_modalities(self) -> list[list[str]]:
        return self.base.task_modalities

    @property
    def backbone(self) -> UNetBackbone:
        return self.base.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The new modules' parameters (what relearning trains)."""
        return list(self.adapters.parameters())

    @classmethod
    def from_base(cls, base: MedUniSeg | MedUniSegStar, tasks: Sequence[int], reduction: int = 4) -> MedUniSegStar:
        """Relearn ``tasks`` of ``base``; a ``MedUniSegStar`` keeps its adapters (tasks already relearned continue
        from them) and gains new ones for the other tasks."""
        if isinstance(base, MedUniSegStar):
            star = cls(base.base, sorted(set(base.relearn_tasks) | {int(t) for t in tasks}), base.reduction)
            for t, mods in base.adapters.items():
                star.adapters[t].load_state_dict(mods.state_dict())
            return star
        return cls(base, tasks, reduction)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network (stored in checkpoints, see :meth:`from_config`)."""
        return {
            "name": "MedUniSegStar",
            "base": self.base.config,
            "relearn_tasks": list(self.relearn_tasks),
            "reduction": self.reduction,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MedUniSegStar:
        """Rebuild a network from :attr:`config`."""
        return cls(MedUniSeg.from_config(config["base"]), config["relearn_tasks"], config.get("reduction", 4))

    def flat_twin(self) -> MedUniSegStar:
        """The 2D twin (see :meth:`MedUniSeg.flat_twin`), on the ``meta`` device."""
        twin = self.__dict__.get("_twin")
        if twin is None:
            twin = MedUniSegStar(self.base.flat_twin(), self.relearn_tasks, self.reduction).to("meta")
            self.__dict__["_twin"] = twin
        twin.train(self.training)
        return twin

    def _decode(self, skips: list[torch.Tensor], prompt: torch.Tensor, task: int) -> Any:
        adapters = self.adapters[str(task)]
        k = self.base.num_classes[task]
        return self.base.backbone.decode(skips, prompt, hook=lambda s, h: adapters[s](h), head_channels=k)

    def forward(self, x: torch.Tensor, task_id: int | torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """As :meth:`MedUniSeg.forward`; relearned tasks go through their adapters."""
        task = task_index(self.default_task if task_id is None else task_id, self.num_tasks, x.shape[0])
        if task not in self.relearn_tasks:
            return self.base(x, task)
        base = self.base
        if base.runs_2d_on_twin(x, task):
            return call_twin(self, self.flat_twin(), "forward", x, task)
        skips, modal = base.encode(x, task)
        prompts = base.task_prompts(skips[-1], modal)
        return self._decode(skips, prompts[:, task : task + 1], task)

    #: called by ``torch.jit.script``: the traces of :meth:`MedUniSeg.__prepare_scriptable__`, adapters included
    __prepare_scriptable__ = MedUniSeg.__prepare_scriptable__

    def forward_all_tasks(
        self, x: torch.Tensor, task_ids: Sequence[int] | None = None
    ) -> list[torch.Tensor | list[torch.Tensor]]:
        """As :meth:`MedUniSeg.forward_all_tasks`; relearned tasks go through their adapters."""
        ids = list(range(self.num_tasks)) if task_ids is None else [task_index(t, self.num_tasks) for t in task_ids]
        if task_ids is None:
            rank = x.ndim - 2
            ids = [t for t in ids if self.task_dims[t] == rank and len(self.task_modalities[t]) == x.shape[1]]
        plain = [t for t in ids if t not in self.relearn_tasks]
        outputs = dict(zip(plain, self.base.forward_all_tasks(x, plain))) if plain else {}
        for t in ids:
            if t in self.relearn_tasks:
                outputs[t] = self.forward(x, t)
        return [outputs[t] for t in ids]

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript and ONNX form of Hermes: the request (target ids and modality) is a model input.

Hermes' eval forward ``network(x, task_ids, modality_id)`` is traceable as it is (the request is a tensor); a trace
fixes the input stem, so the TorchScript model holds one trace per channel count (:func:`scriptable_hermes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks import eval_mode
from torch import nn

from ...export import trace
from .network import Hermes

__all__ = ["HermesExportable", "HermesByStem", "hermes_example_inputs", "scriptable_hermes"]


def hermes_example_inputs(
    network: Hermes, channels: int | None = None, task: int | None = None, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, task_ids, modality_id)`` to trace a :class:`Hermes`: a random patch ``(batch_size, C, *patch)`` and
    the request ``(1, n)`` / ``(1,)`` of ``task`` (default: the first task taking ``channels`` inputs; default
    channels: ``task``'s, else the first stem's)."""
    if channels is None:
        channels = network.task_channels(task) if task is not None else network.backbone.in_channels[0]
    if task is None:
        task = next((i for i in range(network.num_tasks) if network.task_channels(i) == channels), 0)
    ids, mod = network.request([int(task)])
    x = torch.rand(batch_size, int(channels), *network.plan.patch_size, device=ids.device)
    return x, ids, mod


class HermesExportable(nn.Module):
    """Trace target: ``forward(x, task_ids, modality_id)`` of a :class:`Hermes` with every argument required (eval:
    the logits ``(B, n, *patch)``)."""

    def __init__(self, network: Hermes) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        return self.network(x, task_ids, modality_id)


class HermesByStem(nn.Module):
    """Scripted dispatch over one trace per input stem, by the input's channel count.

    ``forward(x, task_ids=None, modality_id=None)``: without a request, the default one (``default_request``, the
    network's default task's targets and modality), so the TorchScript model also runs on the image alone.

    Args:
        traced: the traces, each taking ``(x, task_ids, modality_id)``.
        channels: the input channel count of each trace.
        default_request: ``(task_ids (1, n), modality_id (1,))`` used when ``forward`` gets no request.
    """

    def __init__(
        self, traced: Sequence[nn.Module], channels: Sequence[int], default_request: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        super().__init__()
        self.traced = nn.ModuleList(traced)
        self.channels = [int(c) for c in channels]  # list[int], inferred by TorchScript
        self.register_buffer("default_ids", default_request[0].reshape(1, -1).long().clone())
        self.register_buffer("default_modality", default_request[1].reshape(-1).long().clone())

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor | None = None, modality_id: torch.Tensor | None = None
    ) -> torch.Tensor:
        ids = self.default_ids if task_ids is None else task_ids
        mod = self.default_modality if modality_id is None else modality_id
        i = 0
        for m in self.traced:
            if self.channels[i] == x.shape[1]:
                return m(x, ids, mod)
            i += 1
        raise ValueError("input channel count does not match any stem of the network")


def scriptable_hermes(network: Hermes) -> HermesByStem:
    """TorchScript form of a :class:`Hermes`: one ``torch.jit.trace`` per input stem at the plan's patch in eval mode.

    ``forward(x, task_ids=None, modality_id=None)``: ``x`` ``(B, C, *patch)``, ``task_ids`` ``(1, n)`` or ``(B, n)``
    long global target ids (``-1`` padding), ``modality_id`` ``(1,)`` or ``(B,)``, default the request of the
    network's :attr:`~Hermes.default_task`; returns the eval logits ``(B, n, *patch)`` as the eager network. The
    request's length ``n`` may differ from the traced one. The input checks of the eager network are not part of
    the trace. The network's training mode is restored afterwards.
    """
    with eval_mode(network):
        channels = network.backbone.in_channels
        traced = [trace(HermesExportable(network), hermes_example_inputs(network, c)) for c in channels]
        ids, modality = network.request([network.default_task])
        # the default request without its -1 padding: ts(x) returns the default task's targets only, as network(x)
        return HermesByStem(traced, channels, (ids[:, ids[0] >= 0], modality))

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Building blocks shared by every network: conv-InstanceNorm-LeakyReLU stacks (2D/3D agnostic), the FUSE prompt
module of UniSeg and MedUniSeg, and the task-id check of the prompt-driven networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers import Conv
from torch import nn

__all__ = [
    "InstanceNormAct",
    "conv_norm_act",
    "norm_act",
    "StackedConvBlocks",
    "transposed_conv",
    "init_he",
    "FusePromptModule",
    "task_index",
    "DefaultTask",
]


class InstanceNormAct(ADN):
    """InstanceNorm (affine, eps 1e-5) followed by in-place LeakyReLU(``negative_slope``): MONAI's ``ADN`` with
    ordering ``"NA"`` (children ``N`` and ``A``, the same parameters and state-dict keys) and a faster training pass.

    ``torch.instance_norm`` returns a *view* of the batch-norm output it computes, and an in-place activation on a
    view makes autograd rebuild that view on the way back (``CopySlices``): five more full-resolution operations per
    block in the backward pass (a zero-filled allocation, a clone, three copies) beside the activation's own. When
    a gradient is needed this runs the same kernels in an order without that detour: batch norm of the contiguous
    ``(1, B * C, *spatial)`` view with the affine parameters repeated per sample (what ``torch.instance_norm``
    does), the activation in place on that output, then the view. Values and gradients are bitwise those of
    ``A(N(x))``; for one block at 2 x 32 x 64 x 64 x 32 the forward and backward run 5 fewer full-resolution
    operations and move 0.40 GB less. Without a gradient, and while TorchScript scripts or traces the module
    (export), it is ``A(N(x))`` itself.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of the input.
        negative_slope: LeakyReLU slope, default 0.01.

    Shapes: ``(B, channels, *spatial)`` in and out.
    """

    def __init__(self, spatial_dims: int, channels: int, negative_slope: float = 0.01) -> None:
        super().__init__(
            ordering="NA",
            in_channels=channels,
            norm=("instance", {"affine": True, "eps": 1e-5}),
            norm_dim=spatial_dims,
            act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
        )
        self.spatial_dims = int(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.A(self.N(x))
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.N
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(norm.weight.requires_grad))
        plain = not needs_grad or torch.jit.is_tracing() or x.ndim != self.spatial_dims + 2
        if plain or x.shape[1] != norm.num_features or x[0, 0].numel() == 1:
            return self.A(self.N(x))  # also raises the norm's own errors for a wrong shape or a single voxel
        b, c = x.shape[:2]
        out = torch.batch_norm(
            x.contiguous().view(1, b * c, *x.shape[2:]),  # as torch.instance_norm: channels-last inputs too
            norm.weight.repeat(b),
            norm.bias.repeat(b),
            None,
            None,
            True,
            0.0,
            norm.eps,
            torch.backends.cudnn.enabled,
        )
        return self.A(out).view(x.shape)  # A is the in-place LeakyReLU: on the batch-norm output, not on a view


def norm_act(spatial_dims: int, channels: int, negative_slope: float = 0.01) -> InstanceNormAct:
    """InstanceNorm (affine, eps 1e-5) followed by LeakyReLU(``negative_slope``) (:class:`InstanceNormAct`)."""
    return InstanceNormAct(spatial_dims, channels, negative_slope)


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int] | int = 3,
    stride: Sequence[int] | int = 1,
    negative_slope: float = 0.01,
) -> Convolution:
    """Conv (with bias, same padding) -> InstanceNorm (affine) -> LeakyReLU, as in nnU-Net: MONAI's ``Convolution``
    (children ``conv`` and ``adn``) whose ``adn`` is an :class:`InstanceNormAct`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size per axis, default 3.
        stride: stride per axis, default 1 (a stride of 2 halves that axis of an even-sized input).
        negative_slope: LeakyReLU slope, default 0.01.
    """
    block = Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        adn_ordering="NA",
        act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
        norm=("instance", {"affine": True, "eps": 1e-5}),
        bias=True,
    )
    block.adn = norm_act(spatial_dims, out_channels, negative_slope)  # same children and parameters, faster backward
    return block


class StackedConvBlocks(nn.Sequential):
    """``n`` conv-norm-act blocks; the first has the stride and maps ``in_channels`` to ``out_channels``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: channels of every block's output.
        kernel_size: kernel of every conv.
        stride: stride of the first conv, default 1.
        n: number of blocks, default 2.
        negative_slope: LeakyReLU slope, default 0.01.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] | int,
        stride: Sequence[int] | int = 1,
        n: int = 2,
        negative_slope: float = 0.01,
    ) -> None:
        blocks = [conv_norm_act(spatial_dims, in_channels, out_channels, kernel_size, stride, negative_slope)]
        for _ in range(n - 1):
            blocks.append(conv_norm_act(spatial_dims, out_channels, out_channels, kernel_size, 1, negative_slope))
        super().__init__(*blocks)


def transposed_conv(spatial_dims: int, in_channels: int, out_channels: int, stride: Sequence[int]) -> nn.Module:
    """Transposed convolution without bias whose kernel equals its stride (exact inverse of a strided conv)."""
    return Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, tuple(stride), tuple(stride), bias=False)


def init_he(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """He (Kaiming normal) init of conv and transposed-conv weights, biases to zero (nnU-Net's InitWeights_He)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def task_index(task_id: int | torch.Tensor, num_tasks: int, batch_size: int | None = None) -> int:
    """Turn a task id (int, 0-d tensor, or one id per sample that are all equal) into a checked ``int``.

    Raises:
        ValueError: mixed task ids in one batch, or an id outside ``[0, num_tasks)``.
    """
    if isinstance(task_id, torch.Tensor):
        flat = task_id.reshape(-1)
        if flat.numel() == 0:
            raise ValueError("task_id is empty.")
        if batch_size is not None and flat.numel() not in (1, batch_size):
            raise ValueError(f"task_id has {flat.numel()} entries for a batch of {batch_size}.")
        if bool((flat != flat[0]).any()):
            raise ValueError(
                f"every sample of a batch must come from the same task (UniSeg selects one task prompt and one "
                f"output slice per batch), got task ids {flat.tolist()}; use the task-balanced batch sampler."
            )
        task_id = int(flat[0].item())
    task_id = int(task_id)
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id {task_id} is out of range: this network has {num_tasks} tasks (0..{num_tasks - 1}).")
    return task_id


class DefaultTask:
    """Mixin of the prompt-driven networks: the task ``forward`` segments when it is called with the image alone.

    MONAI's generic tools call a bundle's ``network_def`` with one input (``verify_net_in_out``, ``ckpt_export``,
    ``onnx_export``, the model zoo's checks, MONAI Label's ``SimpleInferer``): the task then comes from
    :attr:`default_task`, which a bundle config binds with ``from_catalog(catalog, default_task=NAME)``. It is a
    plain attribute: not part of the network's ``config`` nor of its state dict, so checkpoints do not change.
    """

    #: the task id ``forward`` uses when it gets none, default ``0``
    default_task: int = 0
    num_tasks: int

    def bind_task(self, task_id: int) -> DefaultTask:
        """Set :attr:`default_task` to ``task_id`` (checked against ``num_tasks``) and return the network."""
        try:
            self.default_task = task_index(task_id, self.num_tasks)
        except ValueError as e:
            raise ValueError(f"default_task: {e}") from None
        return self


class FusePromptModule(nn.Sequential):
    """UniSeg's FUSE: three conv-InstanceNorm-LeakyReLU blocks, ``(C + T) -> (C + T) // 4 -> (C + T) // 4 -> T``.

    Args:
        spatial_dims: 2 or 3.
        feature_channels: ``C``, the bottleneck channels.
        num_tasks: ``T``.
        kernel_size: conv kernel, default 3.

    Shapes: input ``(B, C + T, *bottleneck)`` (features and universal prompt concatenated), output
    ``(B, T, *bottleneck)``: one task-specific prompt per task.
    """

    def __init__(self, spatial_dims: int, feature_channels: int, num_tasks: int, kernel_size: int = 3) -> None:
        c = feature_channels + num_tasks
        hidden = c // 4
        super().__init__(
            StackedConvBlocks(spatial_dims, c, hidden, kernel_size, 1, 2),
            conv_norm_act(spatial_dims, hidden, num_tasks, kernel_size),
        )

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Building blocks shared by every network: conv-InstanceNorm-LeakyReLU stacks, 2D/3D agnostic."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import ADN, Convolution
from monai.networks.layers import Conv
from torch import nn

__all__ = ["conv_norm_act", "norm_act", "StackedConvBlocks", "transposed_conv", "init_he"]


def norm_act(spatial_dims: int, channels: int, negative_slope: float = 0.01) -> ADN:
    """InstanceNorm (affine, eps 1e-5) followed by LeakyReLU(``negative_slope``)."""
    return ADN(
        ordering="NA",
        in_channels=channels,
        norm=("instance", {"affine": True, "eps": 1e-5}),
        norm_dim=spatial_dims,
        act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
    )


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int] | int = 3,
    stride: Sequence[int] | int = 1,
    negative_slope: float = 0.01,
) -> Convolution:
    """Conv (with bias, same padding) -> InstanceNorm (affine) -> LeakyReLU, as in nnU-Net.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size per axis, default 3.
        stride: stride per axis, default 1 (a stride of 2 halves that axis of an even-sized input).
        negative_slope: LeakyReLU slope, default 0.01.
    """
    return Convolution(
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

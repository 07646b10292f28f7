# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Plan-driven nnU-Net-style encoder/decoder with one input stem per channel count and deep supervision."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

from .blocks import StackedConvBlocks, init_he, norm_act, transposed_conv
from .plans import UNetPlan

__all__ = ["UNetBackbone"]


class UNetBackbone(nn.Module):
    """nnU-Net-style U-Net built from a :class:`~uniseg_components.networks.plans.UNetPlan`.

    Encoder stage ``i`` is ``n_conv_per_stage`` conv-InstanceNorm-LeakyReLU blocks with ``features[i]`` channels,
    the first with ``strides[i]`` (strided-conv downsampling). Stage 0's first convolution exists once per input
    channel count in ``in_channels`` (the *stems*, e.g. 1 for CT or MR, 2 for PET/CT, 4 for BraTS); its norm and
    activation and everything after are shared. Decoder stage ``s`` (deepest first) upsamples with a transposed
    conv (kernel = stride, no bias), concatenates the skip of the same level, and applies
    ``n_conv_per_stage_decoder`` blocks. A 1x1 head without bias maps each decoder stage to ``out_channels``.

    ``encode()`` and ``decode()`` can be called separately, and ``decode()`` takes an optional ``extra`` tensor
    concatenated to the bottleneck features before the first upsampling (``decoder_extra_channels`` channels):
    this is where UniSeg's task prompt enters. Both take an optional ``hook(stage, features) -> features`` called
    after every stage, which is how MedUniSeg (modal prior after stage 0) and Hermes (prior fusion at the deep
    stages) change the features in flight. With ``out_channels=0`` no heads are built and :meth:`decode` returns
    the last decoder features.

    Args:
        plan: the architecture plan.
        in_channels: the input channel counts to build stems for, e.g. ``(1, 2, 4)``; default ``(1,)``.
        out_channels: channels of every segmentation head, default 2; 0 builds no heads (``decode`` then returns
            the features of the last decoder stage, ``(B, features[0], *spatial)``).
        decoder_extra_channels: channels of the ``extra`` tensor given to :meth:`decode`, default 0.

    Shapes:
        input ``(B, C, *spatial)`` with ``C`` in ``in_channels`` and ``spatial`` divisible by
        ``plan.total_stride``. Output in eval mode (or without deep supervision): ``(B, out_channels, *spatial)``.
        In training mode with deep supervision: a list of ``num_stages - 1`` tensors, highest resolution first,
        the ``i``-th at the resolution of encoder stage ``i``.

    Example::

        plan = UNetPlan.from_dict({"patch_size": [64, 64, 32], "features": [8, 16, 32],
                                   "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]})
        net = UNetBackbone(plan, in_channels=(1, 2), out_channels=3).eval()
        net(torch.zeros(1, 2, 64, 64, 32)).shape  # (1, 3, 64, 64, 32)
    """

    def __init__(
        self,
        plan: UNetPlan,
        in_channels: Sequence[int] = (1,),
        out_channels: int = 2,
        decoder_extra_channels: int = 0,
    ) -> None:
        super().__init__()
        if not in_channels or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must list positive channel counts, got {list(in_channels)}.")
        if out_channels < 0:
            raise ValueError(f"out_channels must be >= 0, got {out_channels}.")
        self.plan = plan
        self.in_channels = tuple(sorted({int(c) for c in in_channels}))
        self.out_channels = int(out_channels)
        self.decoder_extra_channels = int(decoder_extra_channels)
        dims, f, n = plan.spatial_dims, plan.features, plan.num_stages
        slope = plan.negative_slope

        conv_type = Conv[Conv.CONV, dims]
        k0 = plan.kernel_sizes[0]
        self.stems = nn.ModuleDict(
            {str(c): conv_type(c, f[0], k0, plan.strides[0], tuple(k // 2 for k in k0)) for c in self.in_channels}
        )
        self.stem_norm_act = norm_act(dims, f[0], slope)
        self.encoder = nn.ModuleList()
        if plan.n_conv_per_stage > 1:
            self.encoder.append(
                StackedConvBlocks(dims, f[0], f[0], plan.kernel_sizes[0], 1, plan.n_conv_per_stage - 1, slope)
            )
        else:
            self.encoder.append(nn.Identity())
        for i in range(1, n):
            self.encoder.append(
                StackedConvBlocks(
                    dims, f[i - 1], f[i], plan.kernel_sizes[i], plan.strides[i], plan.n_conv_per_stage, slope
                )
            )
        self.upsamples = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n - 1):
            lvl = n - 2 - s  # the encoder level this decoder stage works at
            below = f[lvl + 1] + (self.decoder_extra_channels if s == 0 else 0)
            self.upsamples.append(transposed_conv(dims, below, f[lvl], plan.strides[lvl + 1]))
            self.decoder.append(
                StackedConvBlocks(
                    dims, 2 * f[lvl], f[lvl], plan.decoder_kernel_sizes[s], 1, plan.n_conv_per_stage_decoder, slope
                )
            )
            if self.out_channels:
                self.heads.append(conv_type(f[lvl], self.out_channels, 1, bias=False))
        self.apply(init_he)

    # ------------------------------------------------------------------ checks
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for a wrong number of spatial dims, an unsupported channel count or a spatial size
        not divisible by the total stride."""
        dims = self.plan.spatial_dims
        if x.ndim != dims + 2:
            raise ValueError(
                f"this network is {dims}D and expects input of shape (B, C, {', '.join('XYZ'[:dims])}), got a "
                f"{x.ndim - 2}D input of shape {tuple(x.shape)}."
            )
        if x.shape[1] not in self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channel(s); this network has input stems for {list(self.in_channels)} "
                f"channel(s) (one per channel count in the task catalog)."
            )
        self.plan.check_divisible(tuple(x.shape[2:]))

    # ------------------------------------------------------------------ forward parts
    def encode(
        self,
        x: torch.Tensor,
        hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Run the encoder.

        Args:
            x: ``(B, C, *spatial)``.
            hook: optional ``hook(stage, features) -> features`` applied to the output of every encoder stage
                (its result is the skip and the next stage's input); default ``None``.

        Returns:
            the output of every encoder stage, highest resolution first; the last is the bottleneck
            ``(B, features[-1], *spatial / total_stride)``.
        """
        self.check_input(x)
        h = self.stem_norm_act(self.stems[str(int(x.shape[1]))](x))  # int(): a traced shape is a tensor
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            if hook is not None:
                h = hook(i, h)
            skips.append(h)
        return skips

    def decode(
        self,
        skips: Sequence[torch.Tensor],
        extra: torch.Tensor | None = None,
        hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        head_channels: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the decoder on the encoder outputs.

        Args:
            skips: the list returned by :meth:`encode`.
            extra: ``(B, decoder_extra_channels, *bottleneck)`` concatenated to the bottleneck before the first
                upsampling; required when ``decoder_extra_channels > 0``.
            hook: optional ``hook(stage, features) -> features`` applied to the output of every decoder stage
                (``stage`` 0 is the deepest), before its head; default ``None``.
            head_channels: compute only the first ``head_channels`` outputs of every head (the task's classes of
                a shared head), with the first rows of its weight: the values of slicing the full output, without
                computing and back-propagating through the channels that would be dropped (the heads are bias-free 1x1
                convolutions; with fewer channels their module, and any hook on it, is bypassed); default ``None`` =
                all ``out_channels``.

        Returns:
            ``(B, head_channels or out_channels, *spatial)`` in eval mode or without deep supervision, else a list
            of the outputs of every decoder stage, highest resolution first. Without heads (``out_channels=0``):
            the last decoder stage's features ``(B, features[0], *spatial)``.
        """
        h = skips[-1]
        if self.decoder_extra_channels:
            if extra is None or extra.shape[1] != self.decoder_extra_channels:
                raise ValueError(
                    f"decode() needs an extra tensor with {self.decoder_extra_channels} channel(s), got "
                    f"{None if extra is None else tuple(extra.shape)}."
                )
            h = torch.cat([h, extra], dim=1)
        elif extra is not None:
            raise ValueError("this backbone was built with decoder_extra_channels=0 and takes no extra tensor.")
        deep = self.plan.deep_supervision and self.training and self.out_channels > 0
        k = self.out_channels if head_channels is None else int(head_channels)
        if self.out_channels and not 1 <= k <= self.out_channels:
            raise ValueError(f"head_channels must be in 1..{self.out_channels}, got {head_channels}.")
        conv = F.conv3d if self.plan.spatial_dims == 3 else F.conv2d
        outputs = []
        for s, (up, dec) in enumerate(zip(self.upsamples, self.decoder)):
            h = up(h)
            h = dec(torch.cat([h, skips[-(s + 2)]], dim=1))
            if hook is not None:
                h = hook(s, h)
            if self.out_channels and (deep or s == len(self.decoder) - 1):
                head = self.heads[s]
                outputs.append(head(h) if k == self.out_channels else conv(h, head.weight[:k]))
        if not self.out_channels:
            return h
        return outputs[::-1] if deep else outputs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``decode(encode(x))``; see the class docstring for shapes."""
        return self.decode(self.encode(x))

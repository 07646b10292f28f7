# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Network plans: the numbers (kernels, strides, channels) a plan-driven U-Net is built from.

A plan is stored in the task catalog (``TaskCatalog.plan``) as a JSON object; :class:`UNetPlan` parses,
validates and completes it. When a catalog has no plan, :func:`auto_plan` derives one from the patch size
and spacing with nnU-Net's rules (halve an axis while it stays at least 4 voxels and is less than twice as coarse
as the finest axis; 1 instead of 3 as kernel size along an axis that is still twice as coarse as the finest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["UNetPlan", "auto_plan", "plan_from_catalog"]


@dataclass(frozen=True)
class UNetPlan:
    """The architecture plan of a U-Net encoder/decoder (nnU-Net style).

    Args:
        spatial_dims: 2 or 3.
        patch_size: training patch, MONAI axis order; must be divisible by :attr:`total_stride`.
        features: output channels of each encoder stage, e.g. ``(32, 64, 128, 256, 320, 320)``.
        kernel_sizes: conv kernel of each encoder stage, one tuple of ``spatial_dims`` ints per stage.
        strides: downsampling stride of the first conv of each stage (stage 0 is normally all ones).
        decoder_kernel_sizes: conv kernel of each decoder stage, deepest first (``len(features) - 1`` entries);
            default ``None`` uses the encoder kernel of the level the decoder stage works at.
        n_conv_per_stage: convs per encoder stage, default 2.
        n_conv_per_stage_decoder: convs per decoder stage, default 2.
        deep_supervision: return one output per decoder stage in training mode, default ``True``.
        negative_slope: LeakyReLU slope, default 0.01.
    """

    spatial_dims: int
    patch_size: tuple[int, ...]
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    decoder_kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    n_conv_per_stage: int = 2
    n_conv_per_stage_decoder: int = 2
    deep_supervision: bool = True
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "kernel_sizes", tuple(tuple(int(k) for k in ks) for ks in self.kernel_sizes))
        object.__setattr__(self, "strides", tuple(tuple(int(s) for s in st) for st in self.strides))
        if self.decoder_kernel_sizes is None:
            n = len(self.features)
            dec = tuple(self.kernel_sizes[n - 2 - i] for i in range(n - 1)) if n >= 2 else ()
        else:
            dec = tuple(tuple(int(k) for k in ks) for ks in self.decoder_kernel_sizes)
        object.__setattr__(self, "decoder_kernel_sizes", dec)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when the plan is inconsistent."""
        d, n = self.spatial_dims, len(self.features)
        if d not in (2, 3):
            raise ValueError(f"plan: spatial_dims must be 2 or 3, got {d}.")
        if n < 2:
            raise ValueError(f"plan: needs at least 2 stages (features), got {list(self.features)}.")
        if len(self.kernel_sizes) != n or len(self.strides) != n:
            raise ValueError(
                f"plan: features, kernel_sizes and strides need one entry per stage ({n}), got "
                f"{len(self.kernel_sizes)} kernel_sizes and {len(self.strides)} strides."
            )
        if len(self.decoder_kernel_sizes) != n - 1:  # type: ignore[arg-type]
            raise ValueError(f"plan: decoder_kernel_sizes needs {n - 1} entries, got {self.decoder_kernel_sizes}.")
        for name, items in (
            ("kernel_sizes", self.kernel_sizes),
            ("strides", self.strides),
            ("decoder_kernel_sizes", self.decoder_kernel_sizes),
        ):
            for it in items:  # type: ignore[union-attr]
                if len(it) != d or any(v < 1 for v in it):
                    raise ValueError(f"plan: every entry of {name} needs {d} positive ints, got {list(it)}.")
        for ks in (*self.kernel_sizes, *self.decoder_kernel_sizes):  # type: ignore[misc]
            if any(k % 2 == 0 for k in ks):
                raise ValueError(f"plan: kernel sizes must be odd (same padding), got {list(ks)}.")
        if any(f < 1 for f in self.features):
            raise ValueError(f"plan: features must be positive, got {list(self.features)}.")
        if self.n_conv_per_stage < 1 or self.n_conv_per_stage_decoder < 1:
            raise ValueError("plan: n_conv_per_stage and n_conv_per_stage_decoder must be >= 1.")
        if len(self.patch_size) != d:
            raise ValueError(f"plan: patch_size needs {d} values, got {list(self.patch_size)}.")
        self.check_divisible(self.patch_size, what="patch_size")

    @property
    def num_stages(self) -> int:
        return len(self.features)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: spatial sizes must be divisible by it."""
        return tuple(math.prod(st[a] for st in self.strides) for a in range(self.spatial_dims))

    def bottleneck_size(self, spatial_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """Spatial size at the bottleneck for an input of ``spatial_size`` (default: the plan's patch)."""
        size = tuple(spatial_size) if spatial_size is not None else self.patch_size
        self.check_divisible(size)
        return tuple(s // t for s, t in zip(size, self.total_stride))

    def check_divisible(self, spatial_size: Sequence[int], what: str = "input spatial size") -> None:
        """Raise ``ValueError`` unless every axis of ``spatial_size`` is divisible by :attr:`total_stride`."""
        ts = self.total_stride
        if len(spatial_size) != len(ts) or any(s % t for s, t in zip(spatial_size, ts)):
            raise ValueError(
                f"{what} {list(spatial_size)} is not divisible by the network's total stride {list(ts)} "
                f"(product of the plan's strides); use a size that is a multiple of it per axis, e.g. "
                f"{[max(t, (s // t) * t) for s, t in zip(spatial_size, ts)]}."
            )

    def with_patch(self, patch_size: Sequence[int]) -> UNetPlan:
        """The same plan with another training patch (checked for divisibility)."""
        return replace(self, patch_size=tuple(patch_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("patch_size", "features"):
            d[k] = list(d[k])
        for k in ("kernel_sizes", "strides", "decoder_kernel_sizes"):
            d[k] = [list(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetPlan:
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"plan: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
        d = dict(d)
        if "spatial_dims" not in d and "patch_size" in d:
            d["spatial_dims"] = len(d["patch_size"])
        missing = {"spatial_dims", "patch_size", "features", "kernel_sizes", "strides"} - set(d)
        if missing:
            raise ValueError(f"plan: missing field(s) {sorted(missing)}.")
        return cls(**d)


def auto_plan(
    patch_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    base_features: int = 32,
    max_features: int = 320,
    min_size: int = 4,
    max_stages: int = 6,
    **overrides: Any,
) -> UNetPlan:
    """Derive a plan from a patch size and spacing with nnU-Net's topology rules.

    Args:
        patch_size: training patch (MONAI axis order); axes are downsampled by 2 while they stay >= ``min_size``
            and, for anisotropic spacing, while the axis is less than twice as coarse as the finest axis; the
            kernel is 1 along an axis at least twice as coarse as the finest one until it has caught up, then 3.
            With spacing ``(1.5, 1.5, 3)`` and patch ``(192, 192, 64)`` this gives UniSeg's plan.
        spacing: voxel spacing per axis, default isotropic.
        base_features: channels of the first stage, default 32; doubled per stage up to ``max_features`` (320).
        min_size: smallest size an axis may be downsampled to, default 4.
        max_stages: most stages (including stage 0), default 6.
        overrides: any other :class:`UNetPlan` field.

    The patch is rounded down to a multiple of the resulting total stride.
    """
    dims = len(patch_size)
    spacing = list(spacing) if spacing is not None else [1.0] * dims
    size, sp = list(patch_size), list(spacing)
    strides: list[list[int]] = [[1] * dims]
    kernel = [3 if sp[a] < 2 * min(sp) else 1 for a in range(dims)]
    kernels: list[list[int]] = [list(kernel)]
    while len(strides) < max_stages:
        poolable = [a for a in range(dims) if size[a] // 2 >= min_size]
        if not poolable:
            break
        fine = min(sp[a] for a in poolable)  # the finest axis among those that can still be downsampled
        st = [2 if a in poolable and sp[a] < 2 * fine else 1 for a in range(dims)]
        if all(s == 1 for s in st):
            break
        size = [s // t for s, t in zip(size, st)]
        sp = [s * t for s, t in zip(sp, st)]
        strides.append(st)
        # once an axis is fine enough for a 3-wide kernel it keeps it (nnU-Net)
        kernel = [3 if kernel[a] == 3 or sp[a] < 2 * min(sp) else 1 for a in range(dims)]
        kernels.append(list(kernel))
    n = len(strides)
    features = [min(base_features * 2**i, max_features) for i in range(n)]
    total = [math.prod(st[a] for st in strides) for a in range(dims)]
    patch = [max(t, (p // t) * t) for p, t in zip(patch_size, total)]
    kw: dict[str, Any] = dict(
        spatial_dims=dims, patch_size=patch, features=features, kernel_sizes=kernels, strides=strides
    )
    kw.update(overrides)
    return UNetPlan(**kw)


def plan_from_catalog(catalog: Any, patch_size: Sequence[int] | None = None, **overrides: Any) -> UNetPlan:
    """The plan of a :class:`~uniseg_components.tasks.TaskCatalog`, with optional overrides.

    Args:
        catalog: the task catalog; its ``plan`` dict is used when present, otherwise :func:`auto_plan` on the
            first task's patch size and spacing.
        patch_size: replaces the plan's training patch (checked for divisibility by the total stride).
        overrides: replace other plan fields (``features``, ``strides``, ``deep_supervision``...).
    """
    dims = catalog.dims
    if catalog.plan:
        d = dict(catalog.plan)
        d.update(overrides)
        if patch_size is not None:
            d["patch_size"] = list(patch_size)
        d.setdefault("spatial_dims", len(d.get("patch_size", catalog.tasks[0].patch_size)))
        d.setdefault("patch_size", list(catalog.tasks[0].patch_size))
        plan = UNetPlan.from_dict(d)
    else:
        first = catalog.tasks[0]
        plan = auto_plan(patch_size or first.patch_size, first.spacing, **overrides)
    if plan.spatial_dims not in dims and len(dims) == 1:
        raise ValueError(f"plan is {plan.spatial_dims}D but the catalog's tasks are {dims[0]}D.")
    return plan

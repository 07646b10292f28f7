# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``uniseg benchmark``: parameter counts and time ratios measured in one run on the current machine.

Ratios (not absolute times) are the figures to compare across machines: both sides of a ratio run in the same
process, interleaved (A, B, A, B...), after a warm-up, and the median of the repetitions is taken. Each method's
benchmark lives in its unit (``methods/<name>/benchmark.py``) and is reached through the method protocol
(``Method.run_benchmark`` / ``Method.format_benchmark``); this module holds what they share.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .losses import TaskDiceCELoss

__all__ = [
    "count_parameters",
    "time_interleaved",
    "train_step",
    "markdown_table",
    "default_device",
    "cpu_patch",
    "environment",
    "run_benchmarks",
]


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], Any]], repeats: int = 3, warmup: int = 1, device: torch.device | None = None
) -> list[float]:
    """Median seconds of each callable, run interleaved ``repeats`` times after ``warmup`` runs each."""
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def train_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    **kw: Any,
) -> Callable[[], None]:
    """One SGD step of ``net(x, **kw)`` against ``y`` with ``loss_fn`` (default :class:`TaskDiceCELoss`)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    loss_fn = TaskDiceCELoss() if loss_fn is None else loss_fn
    scaler = torch.amp.GradScaler(enabled=amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, enabled=amp):
            out = net(x, **kw)
        loss = loss_fn(out, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def markdown_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column markdown table ``| measure | value |`` of ``rows``."""
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'measure':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a:<{w}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_patch(patch: Sequence[int], total_stride: Sequence[int], dev: torch.device) -> tuple[int, ...]:
    """The patch on CUDA; on CPU halved per axis, rounded to the total stride (minutes, not hours)."""
    if dev.type != "cpu":
        return tuple(patch)
    return tuple(max(t, (p // 2 // t) * t) for p, t in zip(patch, total_stride))


def environment(dev: torch.device) -> dict[str, Any]:
    """Device, processor, threads, torch version and whether AMP is used (on CUDA): the head of every report."""
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "amp": dev.type == "cuda",
    }


def run_benchmarks(
    names: Sequence[str] | None = None,
    catalog: Any = None,
    patch_size: Sequence[int] | None = None,
    repeats: int = 3,
    device: str | None = None,
) -> str:
    """Run the benchmark of each named method (default every registered one) in this process and return their
    markdown reports, one section per method.

    Raises:
        ValueError: an unknown method name (the message lists the registered ones).
    """
    from .methods import METHODS, get_method

    methods = [get_method(n) for n in (names or list(METHODS))]
    reports = []
    for m in methods:
        result = m.run_benchmark(catalog=catalog, patch_size=patch_size, repeats=repeats, device=device)
        reports.append(f"### {m.name}\n\n{m.format_benchmark(result)}")
    return "\n\n".join(reports)

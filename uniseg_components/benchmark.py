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
from collections.abc import Callable, Mapping, Sequence
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
    "prepare_run",
    "sliding_window_throughput",
    "matmul_peak_flops",
    "step_flops",
    "step_op_counts",
    "step_efficiency",
    "efficiency_rows",
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
    """One SGD step of ``net(x, **kw)`` against ``y`` with ``loss_fn`` (default :class:`TaskDiceCELoss`); the
    optimiser updates all parameters with multi-tensor (``foreach``) kernels on every device, as it does by default
    on CUDA."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99, nesterov=True, foreach=True)
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


def prepare_run(
    catalog: Any,
    default_catalog: str,
    patch_size: Sequence[int] | None,
    device: str | torch.device | None,
    batch_size: int,
    repeats: int,
    dims: int | None = 3,
) -> tuple[Any, torch.device, bool, Any, tuple[int, ...], dict[str, Any]]:
    """What every method's benchmark starts with: the catalog (``default_catalog`` when ``None``; only its ``dims``-D
    tasks), the device and AMP (on CUDA), the catalog's plan, the timed patch (:func:`cpu_patch` unless given) and the
    head of the result (catalog, :func:`environment`, patches, batch, repeats).

    Returns:
        ``(catalog, device, amp, plan, patch, result)``.
    """
    from .networks import plan_from_catalog
    from .tasks import TaskCatalog

    cat = TaskCatalog.resolve(catalog or default_catalog)
    if dims is not None and cat.dims != [dims]:
        cat = cat.select(dims=dims)
    dev = default_device(device)
    plan = plan_from_catalog(cat)
    patch = tuple(patch_size) if patch_size is not None else cpu_patch(plan.patch_size, plan.total_stride, dev)
    res: dict[str, Any] = {
        "catalog": cat.name,
        **environment(dev),
        "patch": list(patch),
        "catalog_patch": list(plan.patch_size),
        "batch_size": batch_size,
        "repeats": repeats,
    }
    return cat, dev, dev.type == "cuda", plan, patch, res


def sliding_window_throughput(
    network: torch.nn.Module,
    patch: Sequence[int],
    channels: int,
    task_id: int,
    device: torch.device,
    repeats: int = 3,
    volume_factor: float = 2.0,
) -> dict[str, Any]:
    """Seconds and voxels (pixels) per second of task-aware sliding-window inference (windows of ``patch``, 2 per
    pass, 50% overlap) of one image ``volume_factor`` times the patch per axis; AMP on CUDA.

    Returns:
        ``{"size": image size, "seconds", "per_s"}``.
    """
    from .inferers import TaskSlidingWindowInferer

    size = tuple(int(p * volume_factor) for p in patch)
    inferer = TaskSlidingWindowInferer(tuple(patch), sw_batch_size=2, overlap=0.5)
    img = torch.randn(1, channels, *size, device=device)
    network.eval()

    def sliding() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            inferer(img, network, task_id=task_id)

    (seconds,) = time_interleaved([sliding], max(1, repeats - 1), 1, device)
    voxels = 1
    for v in size:
        voxels *= v
    return {"size": list(size), "seconds": seconds, "per_s": voxels / seconds}


def matmul_peak_flops(device: torch.device, size: int | None = None, repeats: int = 5) -> float:
    """The device's dense matrix rate in FLOP/s, measured: the median time of a square matmul of ``size`` (default
    8192 on CUDA, in fp16 as autocast runs the convolutions there; 2048 in fp32 on CPU), ``2 size^3`` FLOPs each.
    The denominator of a training step's share of the peak."""
    n = int(size or (8192 if device.type == "cuda" else 2048))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (seconds,) = time_interleaved([lambda: torch.mm(a, b)], repeats, 2, device)
    return 2.0 * n**3 / seconds


def step_flops(step: Callable[[], None]) -> float:
    """Floating-point operations of one call of ``step`` (a training step: forward, loss and backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


#: ATen operations that only make views or read metadata: no kernel runs for them on a GPU.
_NO_KERNEL_OPS = frozenset(
    "alias as_strided detach empty empty_like empty_strided expand flatten is_same_size lift_fresh narrow new_empty "
    "new_empty_strided permute _reshape_alias reshape select slice split split_with_sizes squeeze t transpose unbind "
    "unflatten unsqueeze view _unsafe_view _local_scalar_dense _record_function_enter_new _record_function_exit".split()
)


def step_op_counts(step: Callable[[], None], full_size: Sequence[int] | None = None) -> dict[str, float]:
    """Count what one call of ``step`` (a training step) asks of a device.

    Every ATen operation that reaches the dispatcher is counted, except views and metadata reads (on a GPU each
    counted operation is at least one kernel launch). Operations that read or write a tensor whose trailing
    dimensions are ``full_size`` (the patch: full-resolution feature maps and logits) are counted apart, with the
    bytes of those full-resolution tensors: the memory traffic a step's elementwise and convolution work moves at
    full resolution. On a GPU, where the convolutions at full resolution are memory-bound and a few thousand small
    kernels cost milliseconds to launch, these two figures rather than the FLOPs set the time of a step. The counts
    depend on the step's precision, not on the machine: the benchmark's CUDA steps run fp16 autocast (casts added,
    half the bytes of fp16 tensors), its CPU steps fp32, so compare counts of the same kind of device. Copies and
    fills are counted with the bytes of every full-resolution tensor they touch, their views included.

    Args:
        step: the training step (forward, loss, backward, optimiser), run once.
        full_size: the spatial size of the patch; ``None`` counts operations only.

    Returns:
        ``{"ops", "full_res_ops", "full_res_gb"}`` (``full_res_*`` 0 without ``full_size``).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    size = None if full_size is None else tuple(int(v) for v in full_size)
    counts = {"ops": 0.0, "full_res_ops": 0.0, "full_res_gb": 0.0}

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in _NO_KERNEL_OPS:
                return out
            counts["ops"] += 1
            if size is not None:
                flat = tree_flatten((args, kwargs, out))[0]
                full = [t for t in flat if isinstance(t, torch.Tensor) and tuple(t.shape[-len(size) :]) == size]
                if full:
                    counts["full_res_ops"] += 1
                    counts["full_res_gb"] += sum(t.numel() * t.element_size() for t in full) / 1e9
            return out

    with _Count():
        step()
    return counts


def step_efficiency(
    steps: Mapping[str, Callable[[], None]],
    seconds: Mapping[str, float],
    device: torch.device,
    peak_flops: float,
    compiled: Mapping[str, Callable[[], None]] | None = None,
    repeats: int = 3,
    full_size: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: seconds per training step (already timed: ``seconds``), TFLOP per step (as :func:`step_flops`),
    achieved TFLOP/s and their share of ``peak_flops`` (:func:`matmul_peak_flops`), the peak GPU memory of a step
    (CUDA only, else ``None``), and, for the models in ``compiled`` (the same step on ``torch.compile`` of the
    network), the compiled step's seconds (after two warm-up steps, which compile) and the eager / compiled ratio;
    and what the step asks of any device (:func:`step_op_counts` at ``full_size``, the steps' patch): operations
    (kernel launches) per step, those at full resolution and the gigabytes of full-resolution tensors they move.

    Returns:
        ``{name: {"s", "tflop", "tflop_s", "peak_share", "peak_gib", "compiled_s", "compile_speedup", "ops",
        "full_res_ops", "full_res_gb"}}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:  # one step gives both: the modes see the same operations
            counts = step_op_counts(step, full_size)
        flops = float(counter.get_total_flops())
        peak_gib = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        s = float(seconds[name])
        out[name] = {
            "s": s,
            "tflop": flops / 1e12,
            "tflop_s": flops / s / 1e12,
            "peak_share": flops / s / peak_flops,
            "peak_gib": peak_gib,
            "compiled_s": None,
            "compile_speedup": None,
            **counts,
        }
    if compiled:
        times = time_interleaved(list(compiled.values()), repeats, 2, device)
        for name, t in zip(compiled, times):
            out[name].update(compiled_s=t, compile_speedup=out[name]["s"] / t)
    return out


def efficiency_rows(efficiency: Mapping[str, Mapping[str, Any]], peak_flops: float) -> list[tuple[str, str]]:
    """The report rows of :func:`step_efficiency`: one per model, after the measured matrix peak."""
    rows = [("matrix peak of this device (measured matmul)", f"{peak_flops / 1e12:.2f} TFLOP/s")]
    for name, e in efficiency.items():
        text = (
            f"{e['s']:.3f} s/step, {e['tflop']:.3f} TFLOP/step, {e['tflop_s']:.2f} TFLOP/s "
            f"({100 * e['peak_share']:.1f}% of peak)"
        )
        if e.get("peak_gib") is not None:
            text += f", peak memory {e['peak_gib']:.2f} GiB"
        if e.get("ops"):
            text += f", {e['ops']:.0f} ops/step"
            if e.get("full_res_ops"):
                text += f" ({e['full_res_ops']:.0f} at full resolution moving {e['full_res_gb']:.2f} GB)"
        if e.get("compiled_s") is not None:
            text += f"; compiled {e['compiled_s']:.3f} s/step ({e['compile_speedup']:.2f}x eager)"
        rows.append((f"(e) {name}", text))
    return rows


def run_benchmarks(
    names: Sequence[str] | None = None,
    catalog: Any = None,
    patch_size: Sequence[int] | None = None,
    repeats: int = 3,
    device: str | None = None,
    compile: bool | None = None,
) -> str:
    """Run the benchmark of each named method (default every registered one) in this process and return their
    markdown reports, one section per method. ``compile`` also times each training step with ``torch.compile`` of
    the network (default: on CUDA only; on a CPU compiling takes minutes).

    Raises:
        ValueError: an unknown method name (the message lists the registered ones).
    """
    from .methods import METHODS, get_method

    methods = [get_method(n) for n in (names or list(METHODS))]
    reports = []
    for m in methods:
        extra = {} if compile is None else {"compile": compile}  # a method's own run_benchmark may predate it
        result = m.run_benchmark(catalog=catalog, patch_size=patch_size, repeats=repeats, device=device, **extra)
        reports.append(f"### {m.name}\n\n{m.format_benchmark(result)}")
    return "\n\n".join(reports)

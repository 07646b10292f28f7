# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``uniseg benchmark``: parameter counts and time ratios measured in one run on the current machine.

Ratios (not absolute times) are the figures to compare across machines: both sides of a ratio run in the same
process, interleaved (A, B, A, B...), after a warm-up, and the median of the repetitions is taken.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .inferers import TaskSlidingWindowInferer
from .losses import HermesLoss, TaskDiceCELoss
from .networks import MedUniSeg, UNetBackbone, UNetPlan, UniSeg, plan_from_catalog
from .tasks import TaskCatalog

__all__ = [
    "BENCHMARKS",
    "count_parameters",
    "time_interleaved",
    "markdown_table",
    "run_benchmark",
    "format_report",
    "run_meduniseg_benchmark",
    "format_meduniseg_report",
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


def _train_step(
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


def run_benchmark(
    catalog: str | None = "uniseg_11tasks",
    patch_size: Sequence[int] | None = None,
    batch_size: int = 2,
    repeats: int = 3,
    device: str | None = None,
    volume_factor: float = 2.0,
) -> dict[str, Any]:
    """Measure parameters, training-step and all-tasks time ratios, and sliding-window throughput.

    Args:
        catalog: catalog whose plan and tasks are measured, default ``"uniseg_11tasks"`` (the paper's plan); only
            its 3D tasks count.
        patch_size: patch for the timed parts; default the catalog's patch on CUDA and, on CPU, the patch halved
            in-plane and through-plane (rounded to the total stride) so that the run takes minutes, not hours.
        batch_size: training batch, default 2.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        volume_factor: the sliding-window volume is ``volume_factor`` times the patch per axis, default 2.
    """
    cat = TaskCatalog.resolve(catalog or "uniseg_11tasks")
    if len(cat.dims) > 1:  # UniSeg is 3D: measure the catalog's 3D tasks
        cat = cat.select(dims=3)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    full_plan = plan_from_catalog(cat)
    if patch_size is None:
        patch = full_plan.patch_size
        if dev.type == "cpu":
            ts = full_plan.total_stride
            patch = tuple(max(t, (p // 2 // t) * t) for p, t in zip(patch, ts))
    else:
        patch = tuple(patch_size)
    res: dict[str, Any] = {
        "catalog": cat.name,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "patch": list(patch),
        "catalog_patch": list(full_plan.patch_size),
        "batch_size": batch_size,
        "repeats": repeats,
        "amp": amp,
    }
    torch.manual_seed(0)
    uniseg = UniSeg.from_catalog(cat, patch_size=patch).to(dev)
    plain = UNetBackbone(uniseg.plan, in_channels=(1,), out_channels=cat[0].num_classes).to(dev)
    full = UniSeg.from_catalog(cat)  # parameters at the catalog's own patch (the prompt follows the patch)
    res["params_uniseg"] = count_parameters(full)
    res["params_backbone"] = count_parameters(UNetBackbone(full_plan, (1,), 2))
    res["params_prompt_fuse"] = count_parameters(full.fuse) + full.prompt.numel()
    del full

    # (b) one training step, UniSeg vs the plain backbone, same patch and batch
    x = torch.randn(batch_size, 1, *patch, device=dev)
    y = torch.randint(0, cat[0].num_classes, (batch_size, 1, *patch), device=dev).float()
    uniseg.train()
    plain.train()
    t_uni, t_plain = time_interleaved(
        [_train_step(uniseg, x, y, amp, task_id=0), _train_step(plain, x, y, amp)], repeats, 1, dev
    )
    res.update(train_step_uniseg_s=t_uni, train_step_backbone_s=t_plain, train_step_ratio=t_uni / t_plain)

    # (c) all-tasks path vs one pass per task (inference, one patch)
    uniseg.eval()
    ids = [t.id for t in cat]  # every task, timed on one 1-channel input
    x1 = torch.randn(1, 1, *patch, device=dev)

    def all_tasks() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            uniseg.forward_all_tasks(x1, ids)

    def separate() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            for t in ids:
                uniseg(x1, t)

    t_all, t_sep = time_interleaved([all_tasks, separate], repeats, 1, dev)
    res.update(all_tasks_n=len(ids), all_tasks_s=t_all, separate_s=t_sep, all_tasks_ratio=t_all / t_sep)
    res["all_tasks_flop_bound"] = _all_tasks_flop_bound(uniseg, x1, len(ids))

    # (d) sliding-window throughput on a volume larger than the patch
    vol = tuple(int(p * volume_factor) for p in patch)
    inferer = TaskSlidingWindowInferer(patch, sw_batch_size=2, overlap=0.5)
    img = torch.randn(1, 1, *vol, device=dev)

    def sliding() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            inferer(img, uniseg, task_id=0)

    (t_sw,) = time_interleaved([sliding], max(1, repeats - 1), 1, dev)
    nvox = 1
    for v in vol:
        nvox *= v
    res.update(sw_volume=list(vol), sw_seconds=t_sw, sw_voxels_per_s=nvox / t_sw)
    return res


def _all_tasks_flop_bound(net: UniSeg, x: torch.Tensor, n: int) -> float:
    """Best possible all-tasks/separate ratio from multiply-accumulate counts: (E + n D) / (n (E + D))."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            skips = net.backbone.encode(x)
            prompts = net.task_prompts(skips[-1])
        enc = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            net.backbone.decode(skips, prompts[:, :1])
        dec = fc.get_total_flops()
    return (enc + n * dec) / (n * (enc + dec))


def format_report(r: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
    rows = [
        ("catalog / device", f"{r['catalog']} / {r['device']} ({r['threads']} threads, torch {r['torch']})"),
        ("timed patch (catalog patch)", f"{r['patch']} ({r['catalog_patch']}), batch {r['batch_size']}"),
        ("(a) UniSeg parameters", f"{r['params_uniseg']:,}"),
        ("(a) plain backbone parameters (1 stem, 2 classes)", f"{r['params_backbone']:,}"),
        ("(a) prompt + FUSE parameters", f"{r['params_prompt_fuse']:,}"),
        (
            "(b) training step UniSeg / backbone",
            f"{r['train_step_ratio']:.3f} ({r['train_step_uniseg_s']:.2f} s / {r['train_step_backbone_s']:.2f} s)",
        ),
        (
            f"(c) all-tasks / separate passes ({r['all_tasks_n']} tasks)",
            f"{r['all_tasks_ratio']:.3f} ({r['all_tasks_s']:.2f} s / {r['separate_s']:.2f} s); "
            f"FLOP bound {r['all_tasks_flop_bound']:.3f}",
        ),
        (
            "(d) sliding-window throughput",
            f"{r['sw_voxels_per_s']:,.0f} voxels/s (volume {r['sw_volume']}, {r['sw_seconds']:.2f} s)",
        ),
    ]
    return markdown_table(rows)


def markdown_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column markdown table ``| measure | value |`` of ``rows``."""
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'measure':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a:<{w}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _default_device(device: str | None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_patch(patch: Sequence[int], total_stride: Sequence[int], dev: torch.device) -> tuple[int, ...]:
    """The patch on CUDA; on CPU halved per axis, rounded to the total stride (minutes, not hours)."""
    if dev.type != "cpu":
        return tuple(patch)
    return tuple(max(t, (p // 2 // t) * t) for p, t in zip(patch, total_stride))


def _environment(dev: torch.device) -> dict[str, Any]:
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "amp": dev.type == "cuda",
    }


def run_meduniseg_benchmark(
    catalog: str | None = None,
    patch_size: Sequence[int] | None = None,
    repeats: int = 3,
    device: str | None = None,
    batch_size: int = 2,
    volume_factor: float = 2.0,
) -> dict[str, Any]:
    """Measure MedUniSeg: parameters against one nnU-Net per task, training-step ratios against the plain
    backbone for a 3D and a 2D task, and 2D and 3D sliding-window throughput.

    Args:
        catalog: default ``"meduniseg_17tasks"`` (the 11 UniSeg tasks and six 2D tasks).
        patch_size: 3D patch for the timed parts (its in-plane part is the 2D patch); default the catalog's 3D
            patch and its first 2D task's patch, halved per axis on CPU.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        batch_size: training batch, default 2.
        volume_factor: the sliding-window image is ``volume_factor`` times the patch per axis, default 2.
    """
    cat = TaskCatalog.resolve(catalog or "meduniseg_17tasks")
    dev = _default_device(device)
    amp = dev.type == "cuda"
    full = MedUniSeg.from_catalog(cat)
    plan = full.plan
    res: dict[str, Any] = {"catalog": cat.name, **_environment(dev), "batch_size": batch_size, "repeats": repeats}
    # (a) one model against one nnU-Net of the same plan per task (its own input channels and classes)
    res["params_meduniseg"] = count_parameters(full)
    res["params_single_models"] = sum(
        count_parameters(UNetBackbone(plan, (t.num_channels,), t.num_classes)) for t in cat
    )
    res["params_priors"] = (
        count_parameters(full.mmap)
        + count_parameters(full.fuse)
        + count_parameters(full.modal_to_fuse)
        + full.prompt.numel()
        + full.modal_prompts.numel()
    )
    res["num_tasks"] = len(cat)
    del full

    t3 = next((t for t in cat if t.dims == 3), None)
    t2 = next((t for t in cat if t.dims == 2), None)
    if patch_size is not None:
        p3, p2 = tuple(patch_size), tuple(patch_size)[:2]
    else:
        p3 = _cpu_patch(plan.patch_size, plan.total_stride, dev)
        p2 = _cpu_patch(t2.patch_size, plan.total_stride[:2], dev) if t2 is not None else None
    res.update(patch_3d=list(p3), patch_2d=None if p2 is None else list(p2))
    torch.manual_seed(0)
    net = MedUniSeg.from_catalog(cat, patch_size=p3).to(dev)
    plain3 = UNetBackbone(net.plan, (1,), 2).to(dev)
    plan2 = UNetPlan.from_dict(
        {
            "patch_size": list(p2 or plan.patch_size[:2]),
            "features": list(plan.features),
            "kernel_sizes": [list(k[:2]) for k in plan.kernel_sizes],
            "strides": [list(st[:2]) for st in plan.strides],
            "decoder_kernel_sizes": [list(k[:2]) for k in plan.decoder_kernel_sizes],
            "n_conv_per_stage": plan.n_conv_per_stage,
            "n_conv_per_stage_decoder": plan.n_conv_per_stage_decoder,
        }
    )
    plain2 = UNetBackbone(plan2, (1,), 2).to(dev)
    res["params_backbone_2d"] = count_parameters(plain2)
    for name, task, patch, plain in (("3d", t3, p3, plain3), ("2d", t2, p2, plain2)):
        if task is None or patch is None:
            continue
        c = task.num_channels
        x = torch.randn(batch_size, c, *patch, device=dev)
        y = torch.randint(0, 2, (batch_size, 1, *patch), device=dev).float()
        xp = x[:, :1]
        net.train()
        plain.train()
        t_med, t_plain = time_interleaved(
            [_train_step(net, x, y, amp, task_id=task.id), _train_step(plain, xp, y, amp)], repeats, 1, dev
        )
        res[f"train_step_{name}"] = {"task": task.name, "meduniseg_s": t_med, "backbone_s": t_plain}
        net.eval()
        vol = tuple(int(v * volume_factor) for v in patch)
        inferer = TaskSlidingWindowInferer(patch, sw_batch_size=2, overlap=0.5)
        img = torch.randn(1, c, *vol, device=dev)

        def sliding(img: torch.Tensor = img, inferer: Any = inferer, tid: int = task.id) -> None:
            with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
                inferer(img, net, task_id=tid)

        (t_sw,) = time_interleaved([sliding], max(1, repeats - 1), 1, dev)
        res[f"sliding_{name}"] = {"size": list(vol), "seconds": t_sw, "per_s": math.prod(vol) / t_sw}
    return res


def format_meduniseg_report(r: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_meduniseg_benchmark` result."""
    rows = [
        ("catalog / device", f"{r['catalog']} / {r['device']} ({r['threads']} threads, torch {r['torch']})"),
        ("timed patches 3D / 2D", f"{r['patch_3d']} / {r['patch_2d']}, batch {r['batch_size']}"),
        ("(a) MedUniSeg parameters", f"{r['params_meduniseg']:,}"),
        (
            f"(a) {r['num_tasks']} single-task nnU-Nets of the same plan",
            f"{r['params_single_models']:,} (MedUniSeg is 1/{r['params_single_models'] / r['params_meduniseg']:.1f})",
        ),
        ("(a) prompts, MMap and FUSE", f"{r['params_priors']:,}"),
    ]
    for name, unit in (("3d", "voxels"), ("2d", "pixels")):
        step = r.get(f"train_step_{name}")
        if step:
            rows.append(
                (
                    f"(b) training step MedUniSeg / {name.upper()} backbone ({step['task']})",
                    f"{step['meduniseg_s'] / step['backbone_s']:.3f} "
                    f"({step['meduniseg_s']:.3f} s / {step['backbone_s']:.3f} s)",
                )
            )
        sw = r.get(f"sliding_{name}")
        if sw:
            rows.append(
                (
                    f"(c) {name.upper()} sliding-window throughput",
                    f"{sw['per_s']:,.0f} {unit}/s (image {sw['size']}, {sw['seconds']:.2f} s)",
                )
            )
    return markdown_table(rows)


#: The benchmark of every model: ``name -> (run function, report formatter)``. Each run function takes the
#: keyword arguments ``catalog`` (its own default when ``None``), ``patch_size``, ``repeats`` and ``device`` and
#: returns a dict that its formatter turns into a markdown table. ``python -m uniseg_components benchmark``
#: runs the models named by ``--model`` (default all) in one process.
BENCHMARKS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = {
    "uniseg": (run_benchmark, format_report),
    "meduniseg": (run_meduniseg_benchmark, format_meduniseg_report),
}


# ---------------------------------------------------------------------------------------------- Hermes
def run_hermes_benchmark(
    catalog: str | TaskCatalog | None = None,
    patch_size: Sequence[int] | None = None,
    repeats: int = 3,
    device: str | None = None,
    batch_size: int = 2,
    volume_factor: float = 2.0,
) -> dict[str, Any]:
    """Measure Hermes: parameters (fusion share, prototypes, modality head, tokens), the training-step time ratio
    against the plain backbone, sliding-window throughput, and one all-targets pass against one pass per target.

    Args:
        catalog: catalog whose plan and tasks are measured, default ``"uniseg_11tasks"``; only its 3D tasks count.
        patch_size: patch for the timed parts; default the catalog's on CUDA, halved per axis on CPU.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        batch_size: training batch, default 2; its samples come from different 1-channel tasks (a mixed batch).
        volume_factor: the sliding-window volume is ``volume_factor`` times the patch per axis, default 2.
    """
    from .networks import Hermes

    cat = TaskCatalog.resolve(catalog or "uniseg_11tasks")
    if len(cat.dims) > 1 or cat.dims != [3]:
        cat = cat.select(dims=3)
    dev = _default_device(device)
    amp = dev.type == "cuda"
    full_plan = plan_from_catalog(cat)
    patch = (
        tuple(patch_size) if patch_size is not None else _cpu_patch(full_plan.patch_size, full_plan.total_stride, dev)
    )
    res: dict[str, Any] = {
        "catalog": cat.name,
        **_environment(dev),
        "patch": list(patch),
        "catalog_patch": list(full_plan.patch_size),
        "batch_size": batch_size,
        "repeats": repeats,
    }
    torch.manual_seed(0)
    net = Hermes.from_catalog(cat, patch_size=patch)
    res["params_hermes"] = count_parameters(net)
    res["params_backbone_features"] = count_parameters(net.backbone)
    res["params_fusion"] = count_parameters(net.fusion)
    res["fusion_share"] = res["params_fusion"] / res["params_hermes"]
    res["params_prototype"] = count_parameters(net.prototype_norm) + count_parameters(net.prototype_mlp) + 1
    res["params_modality_head"] = count_parameters(net.modality_norm) + count_parameters(net.modality_head)
    res["params_tokens"] = count_parameters(net.priors)
    res["fusion_stages"] = list(net.fusion_stages)
    res["blocks_per_stage"] = list(net.blocks_per_stage)
    res["num_targets"] = sum(t["num_targets"] for t in net.tasks)
    net = net.to(dev)
    one_channel = [t.id for t in cat if t.num_channels == 1] or [cat[0].id]
    tasks = [one_channel[i % len(one_channel)] for i in range(batch_size)]
    k_min = min(net.tasks[t]["num_targets"] for t in tasks)
    plain = UNetBackbone(net.plan, in_channels=(1,), out_channels=k_min + 1).to(dev)

    # (b) one training step, Hermes (mixed request, partial-label loss) vs the plain backbone, same patch and batch
    x = torch.randn(batch_size, 1, *patch, device=dev)
    y = torch.randint(0, k_min + 1, (batch_size, 1, *patch), device=dev).float()
    net.train()
    plain.train()
    t_h, t_plain = time_interleaved(
        [
            _train_step(net, x, y, amp, HermesLoss(), task_id=torch.tensor(tasks, device=dev)),
            _train_step(plain, x, y, amp),
        ],
        repeats,
        1,
        dev,
    )
    res.update(
        train_tasks=tasks, train_step_hermes_s=t_h, train_step_backbone_s=t_plain, train_step_ratio=t_h / t_plain
    )
    del plain

    # (c) sliding-window throughput on a volume larger than the patch (one dataset's targets per window)
    net.eval()
    vol = tuple(int(p * volume_factor) for p in patch)
    inferer = TaskSlidingWindowInferer(patch, sw_batch_size=2, overlap=0.5)
    img = torch.randn(1, 1, *vol, device=dev)

    def sliding() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            inferer(img, net, task_id=one_channel[0])

    (t_sw,) = time_interleaved([sliding], max(1, repeats - 1), 1, dev)
    res.update(sw_volume=list(vol), sw_seconds=t_sw, sw_voxels_per_s=math.prod(vol) / t_sw)

    # (d) every target of every task in one pass vs one pass per target (one patch, the first modality)
    targets = [g for t in range(net.num_tasks) for g in net.task_targets(t)]
    x1 = torch.randn(1, 1, *patch, device=dev)
    mod = torch.zeros(1, dtype=torch.long, device=dev)
    all_ids = torch.tensor([targets + [-1]], device=dev)
    single = [torch.tensor([[g, -1]], device=dev) for g in targets]

    def all_targets() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            net(x1, all_ids, mod)

    def per_target() -> None:
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
            for ids in single:
                net(x1, ids, mod)

    t_all, t_sep = time_interleaved([all_targets, per_target], repeats, 1, dev)
    res.update(all_targets_n=len(targets), all_targets_s=t_all, per_target_s=t_sep, all_targets_ratio=t_all / t_sep)
    return res


def format_hermes_report(r: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_hermes_benchmark` result."""
    stages = ", ".join(f"{s}x{b}" for s, b in zip(r["fusion_stages"], r["blocks_per_stage"]))
    rows = [
        ("catalog / device", f"{r['catalog']} / {r['device']} ({r['threads']} threads, torch {r['torch']})"),
        ("timed patch (catalog patch)", f"{r['patch']} ({r['catalog_patch']}), batch {r['batch_size']}"),
        ("(a) Hermes parameters", f"{r['params_hermes']:,} ({r['num_targets']} targets)"),
        ("(a) backbone (features, stems)", f"{r['params_backbone_features']:,}"),
        (
            "(a) prior-fusion layers",
            f"{r['params_fusion']:,} ({100 * r['fusion_share']:.1f}% of Hermes; blocks {stages})",
        ),
        (
            "(a) prototype MLP / modality head / prior tokens",
            (f"{r['params_prototype']:,} / {r['params_modality_head']:,} / {r['params_tokens']:,}"),
        ),
        (
            "(b) training step Hermes / backbone",
            f"{r['train_step_ratio']:.3f} ({r['train_step_hermes_s']:.2f} s / {r['train_step_backbone_s']:.2f} s; "
            f"mixed batch of tasks {r['train_tasks']})",
        ),
        (
            "(c) sliding-window throughput",
            f"{r['sw_voxels_per_s']:,.0f} voxels/s (volume {r['sw_volume']}, {r['sw_seconds']:.2f} s)",
        ),
        (
            f"(d) all {r['all_targets_n']} targets in one pass / one pass per target",
            f"{r['all_targets_ratio']:.3f} ({r['all_targets_s']:.2f} s / {r['per_target_s']:.2f} s)",
        ),
    ]
    return markdown_table(rows)


BENCHMARKS["hermes"] = (run_hermes_benchmark, format_hermes_report)
__all__ += ["run_hermes_benchmark", "format_hermes_report"]

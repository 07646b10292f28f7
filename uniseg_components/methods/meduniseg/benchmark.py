# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg's benchmark: parameters against one nnU-Net per task, training-step ratios against the plain backbone
for a 3D and a 2D task, and 2D and 3D sliding-window throughput."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...benchmark import (
    count_parameters,
    cpu_patch,
    efficiency_rows,
    markdown_table,
    matmul_peak_flops,
    prepare_run,
    sliding_window_throughput,
    step_efficiency,
    time_interleaved,
    train_step,
)
from ...networks import UNetBackbone
from ...tasks import TaskCatalog
from .network import MedUniSeg, flat_plan

__all__ = ["run_benchmark", "format_report"]


def run_benchmark(
    catalog: str | TaskCatalog | None = None,
    patch_size: Sequence[int] | None = None,
    repeats: int = 3,
    device: str | None = None,
    batch_size: int = 2,
    volume_factor: float = 2.0,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Measure MedUniSeg: parameters against one nnU-Net per task, training-step ratios against the plain
    backbone for a 3D and a 2D task, 2D and 3D sliding-window throughput, and each training step's FLOPs, TFLOP/s,
    share of the device's matrix peak and peak memory (eager, and compiled).

    Args:
        catalog: default ``"meduniseg_17tasks"`` (the 11 UniSeg tasks and six 2D tasks).
        patch_size: 3D patch for the timed parts (its in-plane part is the 2D patch); default the catalog's 3D
            patch and its first 2D task's patch, halved per axis on CPU.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        batch_size: training batch, default 2.
        volume_factor: the sliding-window image is ``volume_factor`` times the patch per axis, default 2.
        compile: also time the steps with ``torch.compile`` of the networks, default on CUDA only.
    """
    cat, dev, amp, plan, p3, res = prepare_run(
        catalog, "meduniseg_17tasks", patch_size, device, batch_size, repeats, dims=None
    )
    compile = dev.type == "cuda" if compile is None else bool(compile)
    res["matmul_peak_flops"] = matmul_peak_flops(dev)
    res["efficiency"] = {}
    full = MedUniSeg.from_catalog(cat)
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
        p2 = p3[:2]
    else:
        p2 = cpu_patch(t2.patch_size, plan.total_stride[:2], dev) if t2 is not None else None
    res.update(patch_3d=list(p3), patch_2d=None if p2 is None else list(p2))
    torch.manual_seed(0)
    net = MedUniSeg.from_catalog(cat, patch_size=p3).to(dev)
    plain3 = UNetBackbone(net.plan, (1,), 2).to(dev)
    plan2 = flat_plan(plan).with_patch(p2 or plan.patch_size[:2])
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
        label = name.upper()
        steps = {
            f"MedUniSeg {label}": train_step(net, x, y, amp, task_id=task.id),
            f"plain {label} backbone": train_step(plain, xp, y, amp),
        }
        t_med, t_plain = time_interleaved(list(steps.values()), repeats, 1, dev)
        res[f"train_step_{name}"] = {"task": task.name, "meduniseg_s": t_med, "backbone_s": t_plain}
        compiled = None
        if compile:
            compiled = {
                f"MedUniSeg {label}": train_step(torch.compile(net), x, y, amp, task_id=task.id),
                f"plain {label} backbone": train_step(torch.compile(plain), xp, y, amp),
            }
        seconds = dict(zip(steps, (t_med, t_plain)))
        res["efficiency"].update(
            step_efficiency(steps, seconds, dev, res["matmul_peak_flops"], compiled, repeats, patch)
        )
        res[f"sliding_{name}"] = sliding_window_throughput(net, patch, c, task.id, dev, repeats, volume_factor)
    return res


def format_report(r: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
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
    if r.get("efficiency"):
        rows += efficiency_rows(r["efficiency"], r["matmul_peak_flops"])
    return markdown_table(rows)

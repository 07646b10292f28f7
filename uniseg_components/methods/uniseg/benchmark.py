# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg's benchmark: parameters, the training-step ratio against the plain backbone, the all-tasks path against
separate passes, and sliding-window throughput."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...benchmark import (
    count_parameters,
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
from .network import UniSeg

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
    """Measure parameters, training-step and all-tasks time ratios, sliding-window throughput, and each training
    step's FLOPs, TFLOP/s, share of the device's matrix peak and peak memory (eager, and compiled).

    Args:
        catalog: catalog whose plan and tasks are measured, default ``"uniseg_11tasks"`` (the paper's plan); only
            its 3D tasks count.
        patch_size: patch for the timed parts; default the catalog's patch on CUDA and, on CPU, the patch halved
            in-plane and through-plane (rounded to the total stride) so that the run takes minutes, not hours.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        batch_size: training batch, default 2.
        volume_factor: the sliding-window volume is ``volume_factor`` times the patch per axis, default 2.
        compile: also time the steps with ``torch.compile`` of the networks, default on CUDA only.
    """
    cat, dev, amp, full_plan, patch, res = prepare_run(
        catalog, "uniseg_11tasks", patch_size, device, batch_size, repeats
    )
    compile = dev.type == "cuda" if compile is None else bool(compile)
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
    steps = {"UniSeg": train_step(uniseg, x, y, amp, task_id=0), "plain backbone": train_step(plain, x, y, amp)}
    t_uni, t_plain = time_interleaved(list(steps.values()), repeats, 1, dev)
    res.update(train_step_uniseg_s=t_uni, train_step_backbone_s=t_plain, train_step_ratio=t_uni / t_plain)
    # (e) FLOPs and the share of the device's matrix peak; eager and compiled
    res["matmul_peak_flops"] = matmul_peak_flops(dev)
    compiled = None
    if compile:
        compiled = {
            "UniSeg": train_step(torch.compile(uniseg), x, y, amp, task_id=0),
            "plain backbone": train_step(torch.compile(plain), x, y, amp),
        }
    res["efficiency"] = step_efficiency(
        steps, {"UniSeg": t_uni, "plain backbone": t_plain}, dev, res["matmul_peak_flops"], compiled, repeats, patch
    )

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
    sw = sliding_window_throughput(uniseg, patch, 1, 0, dev, repeats, volume_factor)
    res.update(sw_volume=sw["size"], sw_seconds=sw["seconds"], sw_voxels_per_s=sw["per_s"])
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
    if "efficiency" in r:
        rows += efficiency_rows(r["efficiency"], r["matmul_peak_flops"])
    return markdown_table(rows)

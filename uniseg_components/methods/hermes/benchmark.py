# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes' benchmark: parameters (fusion share, prototypes, modality head, tokens), the training-step ratio against the
plain backbone, sliding-window throughput, and one all-targets pass against one pass per target."""

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
from .loss import HermesLoss
from .network import Hermes

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
    """Measure Hermes: parameters (fusion share, prototypes, modality head, tokens), the training-step time ratio
    against the plain backbone, sliding-window throughput, one all-targets pass against one pass per target, and
    each training step's FLOPs, TFLOP/s, share of the device's matrix peak and peak memory (eager, and compiled).

    Args:
        catalog: catalog whose plan and tasks are measured, default ``"uniseg_11tasks"``; only its 3D tasks count.
        patch_size: patch for the timed parts; default the catalog's on CUDA, halved per axis on CPU.
        repeats: timed repetitions (median), default 3.
        device: default CUDA when available else CPU.
        batch_size: training batch, default 2; its samples come from different 1-channel tasks (a mixed batch).
        volume_factor: the sliding-window volume is ``volume_factor`` times the patch per axis, default 2.
        compile: also time the steps with ``torch.compile`` of the networks, default on CUDA only.
    """
    cat, dev, amp, full_plan, patch, res = prepare_run(
        catalog, "uniseg_11tasks", patch_size, device, batch_size, repeats
    )
    compile = dev.type == "cuda" if compile is None else bool(compile)
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
    ids = torch.tensor(tasks, device=dev)
    steps = {
        "Hermes": train_step(net, x, y, amp, HermesLoss(), task_id=ids),
        "plain backbone": train_step(plain, x, y, amp),
    }
    t_h, t_plain = time_interleaved(list(steps.values()), repeats, 1, dev)
    res.update(
        train_tasks=tasks, train_step_hermes_s=t_h, train_step_backbone_s=t_plain, train_step_ratio=t_h / t_plain
    )
    # (e) FLOPs and the share of the device's matrix peak; eager and compiled
    res["matmul_peak_flops"] = matmul_peak_flops(dev)
    compiled = None
    if compile:
        compiled = {
            "Hermes": train_step(torch.compile(net), x, y, amp, HermesLoss(), task_id=ids),
            "plain backbone": train_step(torch.compile(plain), x, y, amp),
        }
    res["efficiency"] = step_efficiency(
        steps, {"Hermes": t_h, "plain backbone": t_plain}, dev, res["matmul_peak_flops"], compiled, repeats, patch
    )
    del plain, steps, compiled

    # (c) sliding-window throughput on a volume larger than the patch (one dataset's targets per window)
    sw = sliding_window_throughput(net, patch, 1, one_channel[0], dev, repeats, volume_factor)
    res.update(sw_volume=sw["size"], sw_seconds=sw["seconds"], sw_voxels_per_s=sw["per_s"])

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


def format_report(r: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
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
    if "efficiency" in r:
        rows += efficiency_rows(r["efficiency"], r["matmul_peak_flops"])
    return markdown_table(rows)

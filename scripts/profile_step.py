# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Profile one training step of each method and of the plain backbone with ``torch.profiler``.

Prints per model: device time per step, the kernels (CUDA) or operators (CPU) launched per step, and the operations
that take the most device time, and writes one Chrome trace per model (open in chrome://tracing or Perfetto). The step
is the benchmark's (``uniseg_components.benchmark.train_step``: forward, loss, backward, SGD; fp16 autocast on CUDA)
at the catalog's patch on CUDA and half of it per axis on CPU, batch 2.

Usage::

    python scripts/profile_step.py [--models uniseg,meduniseg,hermes] [--patch 192,192,64] [--catalog NAME]
        [--out runs/profile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from uniseg_components.benchmark import cpu_patch, default_device, train_step
from uniseg_components.methods.hermes import Hermes, HermesLoss
from uniseg_components.methods.meduniseg import MedUniSeg
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.networks import UNetBackbone, plan_from_catalog
from uniseg_components.tasks import TaskCatalog


def build_steps(
    models: list[str], patch: tuple[int, ...] | None, dev: torch.device, batch: int, catalog: str = ""
) -> dict:
    """The training steps to profile: ``{name: (step, patch)}``; the plain backbone first. ``catalog`` (a built-in
    name or JSON path) replaces the papers' catalogs (``uniseg_11tasks``, MedUniSeg's ``meduniseg_17tasks``)."""
    full = TaskCatalog.resolve(catalog) if catalog else None
    cat = full.select(dims=3) if full is not None else TaskCatalog.builtin("uniseg_11tasks")
    plan = plan_from_catalog(cat)
    p = tuple(patch) if patch else cpu_patch(plan.patch_size, plan.total_stride, dev)
    amp = dev.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *p, device=dev)
    y = torch.randint(0, 2, (batch, 1, *p), device=dev).float()
    steps = {"plain backbone": train_step(UNetBackbone(plan.with_patch(p), (1,), 2).to(dev).train(), x, y, amp)}
    if "uniseg" in models:
        net = UniSeg.from_catalog(cat, patch_size=p).to(dev).train()
        steps["UniSeg"] = train_step(net, x, y, amp, task_id=0)
    if "meduniseg" in models:
        med_catalog = full if full is not None else TaskCatalog.builtin("meduniseg_17tasks")
        net = MedUniSeg.from_catalog(med_catalog, patch_size=p).to(dev).train()
        steps["MedUniSeg 3D"] = train_step(net, x, y, amp, task_id=0)
    if "hermes" in models:
        net = Hermes.from_catalog(cat, patch_size=p).to(dev).train()
        tasks = torch.tensor([i % 2 for i in range(batch)], device=dev)
        steps["Hermes"] = train_step(net, x, y, amp, HermesLoss(), task_id=tasks)
    return {name: (step, p) for name, step in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="uniseg,meduniseg,hermes")
    parser.add_argument("--catalog", default="", help="built-in name or JSON, default the papers' catalogs")
    parser.add_argument("--patch", default="", help="comma-separated, default the catalog's (halved on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per model (after 3 warm-up steps)")
    parser.add_argument("--device", default="")
    parser.add_argument("--out", default="runs/profile")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    dev = default_device(args.device or None)
    patch = tuple(int(v) for v in args.patch.split(",")) if args.patch else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    steps = build_steps([m.strip().lower() for m in args.models.split(",")], patch, dev, args.batch, args.catalog)
    print(f"device {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, torch {torch.__version__}, batch {args.batch}")
    for name, (step, p) in steps.items():
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize(dev)
        events = prof.key_averages()
        if cuda:
            kernels = [  # GPU work: kernels, memcpy and memset; not the user annotations of the GPU timeline
                e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
            ]
            launched = len(kernels) / args.steps
            device_ms = sum(k.time_range.elapsed_us() for k in kernels) / 1e3 / args.steps  # kernels' busy time
        else:
            launched = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
            device_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
        unit = "CUDA kernels (memcpy and memset included)" if cuda else "aten operator calls (nested calls included)"
        print(f"\n### {name} (patch {list(p)})\n")
        print(f"{device_ms:.1f} ms device time per step, {launched:.0f} {unit} per step\n")
        print(events.table(sort_by=sort, row_limit=args.rows))
        trace = out / f"{name.replace(' ', '_').lower()}.json"
        prof.export_chrome_trace(str(trace))
        print(f"trace: {trace}")


if __name__ == "__main__":
    main()

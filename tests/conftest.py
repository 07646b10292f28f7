# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Shared test fixtures and helpers: bundle paths and runs, the MONAI Label-style parser, a single-threaded torch, the
tiny plan the network tests build on, and an independent reference of the inference chain.

Everything here makes its own tiny data and runs on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
#: one epoch of one batch per task, no augmentation: the bundle tests' training runs
FAST = {"epochs": 1, "batches_per_task": 1, "augment": False, "sw_batch_size": 4}
#: a 4-stage plan of a few thousand parameters for 16^3 patches (network, export and Hermes tests)
TINY_PLAN = {
    "patch_size": [16, 16, 16],
    "features": [4, 8, 16, 16],
    "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": 1,
    "n_conv_per_stage_decoder": 1,
}


def config(bundle: str, name: str) -> str:
    """The path of ``bundles/<bundle>/configs/<name>`` as a string (what ``ConfigWorkflow`` takes)."""
    return str(BUNDLES / bundle / "configs" / name)


def subprocess_env() -> dict[str, str]:
    """The environment of a test's subprocess: one thread, glibc keeping freed memory, this checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="1073741824")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def workflow(
    bundle: str, configs: str | Sequence[str], bundle_root: Path, workflow_type: str = "train", **override: Any
) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundle``'s config file(s) (names in ``configs/`` or paths) with
    ``bundle_root`` and the bundle's ``logging.conf``."""
    files = [configs] if isinstance(configs, str) else list(configs)
    files = [f if os.sep in f else config(bundle, f) for f in files]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        logging_file=config(bundle, "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **override,
    )
    wf.initialize()
    return wf


def run(wf: ConfigWorkflow) -> ConfigWorkflow:
    """Run and finalise a workflow; returns it."""
    wf.run()
    wf.finalize()
    return wf


def monai_label_parser(bundle: str, bundle_root: Path, **overrides: Any) -> ConfigParser:
    """Parse ``inference.json`` + ``metadata.json`` as MONAI Label's ``BundleInferTask`` does (string device,
    ``bundle_root`` set)."""
    parser = ConfigParser()
    parser.read_config(config(bundle, "inference.json"))
    parser.read_meta(config(bundle, "metadata.json"))
    parser.update({"bundle_root": str(bundle_root), "device": "cpu", **overrides})
    return parser


@pytest.fixture(scope="module")
def single_thread():
    """Tiny convolutions run fastest (and deterministically) on one thread, even on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_prediction(network: torch.nn.Module, catalog: Any, image: str, task: str, sigmoid: bool = False) -> Any:
    """The label map of ``image`` for ``task`` on the file's grid, computed step by step without the bundle configs:
    the package's inference transforms, the task-aware sliding window (the plan's patch, or the task's for a catalog
    mixing ranks), softmax (or sigmoid) probabilities, ``Invertd``, argmax (or the sigmoid targets' label map).
    The bundles' inference must give exactly this."""
    from monai.transforms import Invertd

    from uniseg_components.inferers import TaskSlidingWindowInferer
    from uniseg_components.methods.hermes import targets_to_label
    from uniseg_components.transforms import inference_transforms

    pre = inference_transforms(catalog)
    data = pre({"image": image, "task": task})
    plan = network.plan
    mixed = any(t.dims != plan.spatial_dims for t in catalog)
    inferer = TaskSlidingWindowInferer(plan.patch_size, 2, 0.5, catalog=catalog if mixed else None)
    with torch.no_grad():
        logits = inferer(data["image"][None], network.eval(), task_id=int(data["task_id"]))[0].float()
    data["pred"] = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, 0)
    pred = Invertd("pred", pre, orig_keys="image", nearest_interp=False, to_tensor=True)(data)["pred"]
    return targets_to_label(pred, sigmoid=False) if sigmoid else pred.argmax(0, keepdim=True)


def reference_all_tasks(network: torch.nn.Module, catalog: Any, image: str, modalities: Sequence[str]) -> Any:
    """The merged label map of every task of ``modalities`` for ``image`` (softmax methods), step by step: the first
    task's preprocessing, one encoder pass per window (``TaskSlidingWindowInferer.all_tasks``), argmax per task,
    ``merge_task_labels``, ``Invertd`` with nearest interpolation."""
    from monai.transforms import Invertd

    from uniseg_components.inferers import TaskSlidingWindowInferer, merge_task_labels, tasks_for_image
    from uniseg_components.transforms import inference_transforms

    tasks = tasks_for_image(catalog, image, modalities)
    pre = inference_transforms(catalog)
    data = pre({"image": image, "task": tasks[0].name})
    plan = network.plan
    mixed = any(t.dims != plan.spatial_dims for t in catalog)
    inferer = TaskSlidingWindowInferer(plan.patch_size, 2, 0.5, catalog=catalog if mixed else None)
    with torch.no_grad():
        logits = inferer.all_tasks(data["image"][None], network.eval(), [t.id for t in tasks])
    data["pred"] = merge_task_labels([lg[0].float().argmax(0, keepdim=True) for lg in logits], tasks).float()
    pred = Invertd("pred", pre, orig_keys="image", nearest_interp=True, to_tensor=True)(data)["pred"]
    return pred.round().to(torch.int16), tasks

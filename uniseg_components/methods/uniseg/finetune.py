# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Downstream fine-tuning: move upstream UniSeg weights into :class:`UniSegDownstream`, and the bundle's glue.

UniSeg (Ye et al., MICCAI 2023) fine-tunes its upstream model on a new task by keeping every weight of the
stems, encoder and decoder, dropping the universal prompt and FUSE (and therefore the prompt's input channel of
the first transposed convolution), and training new segmentation heads for the new task's classes. Nothing is
frozen. :func:`load_upstream_weights` does exactly that and reports what it loaded, adapted and skipped.

The other functions are the glue of ``bundles/uniseg_finetune_segmentation`` (kept here so that the bundle's
configs stay flat): :func:`task_catalog` (one task of a catalog), :func:`prepare_task_data` (datalist of that task,
building the embedded demo collection when it is absent) and :func:`inference_items`; the sampler and its epoch
seeding are the upstream bundle's (:func:`uniseg_components.bundle.task_sampler`,
:class:`uniseg_components.bundle.EpochSeedHandler`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checkpoints import read_checkpoint
from ...distributed import unwrap
from ...io import list_images
from ...tasks import TaskCatalog

__all__ = [
    "PLAN_FIELDS",
    "load_upstream_weights",
    "task_catalog",
    "prepare_task_data",
    "inference_items",
]

logger = logging.getLogger("uniseg_components.finetune")

#: plan fields that decide the weight shapes; they must match between upstream and downstream (the patch size and
#: deep supervision need not: the downstream model has no prompt whose size follows the patch).
PLAN_FIELDS = (
    "spatial_dims",
    "features",
    "kernel_sizes",
    "strides",
    "decoder_kernel_sizes",
    "n_conv_per_stage",
    "n_conv_per_stage_decoder",
)

_UPSTREAM_ONLY = ("prompt", "fuse.")


def _read_upstream(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    if isinstance(checkpoint, Mapping):
        obj: Mapping[str, Any] = checkpoint
        name = "<checkpoint dict>"
    else:
        name = str(checkpoint)
        obj = read_checkpoint(checkpoint, what="upstream checkpoint")
    state = obj.get("model", obj)
    meta = obj.get("meta") if "model" in obj else None
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith("backbone.") for k in state):
        raise ValueError(f"upstream checkpoint {name!r} has no 'backbone.*' weights; is it a UniSeg checkpoint?")
    return state, (meta.get("network") if isinstance(meta, Mapping) else None)


def _check_plans(network: nn.Module, upstream_config: Mapping[str, Any] | None, name: str) -> None:
    if upstream_config is None or "plan" not in upstream_config or not hasattr(network, "plan"):
        return
    up = dict(upstream_config["plan"])
    down = network.plan.to_dict()
    diff = {f: (up.get(f), down.get(f)) for f in PLAN_FIELDS if f in up and up.get(f) != down.get(f)}
    if diff:
        lines = "; ".join(f"{f}: upstream {u} vs downstream {d}" for f, (u, d) in diff.items())
        raise ValueError(
            f"the plan of upstream checkpoint {name!r} ({upstream_config.get('name', '?')}) differs from the "
            f"downstream network's plan ({lines}); build the downstream network with the upstream plan (same "
            "catalog plan / plan overrides)."
        )


def load_upstream_weights(
    network: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], verbose: bool = True
) -> dict[str, list[str]]:
    """Copy the weights of an upstream UniSeg checkpoint into a downstream network (in place).

    * every ``backbone.*`` weight whose name and shape match is loaded (stems, encoder, decoder, norms);
    * ``backbone.upsamples.0.weight`` (the first transposed convolution, input channels ``features[-1] + 1``
      upstream) is *adapted*: the prompt's input channel is dropped by keeping ``weight[:features[-1]]`` (the
      input channel is dimension 0 of a transposed convolution's weight);
    * the segmentation heads keep their fresh initialisation (the new task has its own classes), the universal
      prompt and FUSE are skipped, as are input stems for channel counts the downstream task does not use.

    Nothing is frozen: UniSeg fine-tunes the whole network.

    Args:
        network: a :class:`~uniseg_components.networks.UniSegDownstream` (or another module with ``backbone.*``
            weights laid out the same way); a DDP wrapper is unwrapped.
        checkpoint: path of an upstream checkpoint written by training (``{"model": state_dict, "meta": ...}``),
            a plain UniSeg state dict, or such a dict already loaded.
        verbose: log the report, default ``True``.

    Returns:
        ``{"loaded": [...], "adapted": [...], "reinitialised": [...], "skipped": [...], "missing": [...]}``:
        names of downstream weights loaded as is, adapted, left at their new initialisation (heads), upstream
        weights not used, and downstream weights the upstream checkpoint has no counterpart for (e.g. a stem for a
        new channel count; they keep their initialisation).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be read, is not a UniSeg checkpoint, or its plan differs from the network's (the
            message names both plans), or a weight's shape does not fit (the message names both shapes).
    """
    module = unwrap(network)
    name = "<checkpoint dict>" if isinstance(checkpoint, Mapping) else str(checkpoint)
    upstream, upstream_config = _read_upstream(checkpoint)
    _check_plans(module, upstream_config, name)
    target = module.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "adapted": [], "reinitialised": [], "skipped": [], "missing": []}
    new_state: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        if key.startswith("backbone.heads."):
            report["reinitialised"].append(key)
            continue
        if key not in upstream:
            report["missing"].append(key)
            continue
        src = upstream[key]
        if (
            key == "backbone.upsamples.0.weight"
            and src.shape[0] == value.shape[0] + 1
            and src.shape[1:] == value.shape[1:]
        ):
            new_state[key] = src[: value.shape[0]].clone()
            report["adapted"].append(key)
            continue
        if tuple(src.shape) != tuple(value.shape):
            raise ValueError(
                f"weight {key!r}: upstream checkpoint {name!r} has shape {tuple(src.shape)}, the downstream network "
                f"{tuple(value.shape)}; the two networks were built from different plans."
            )
        new_state[key] = src
        report["loaded"].append(key)
    report["skipped"] = sorted(k for k in upstream if k not in new_state)
    if not report["loaded"]:
        raise ValueError(f"no weight of upstream checkpoint {name!r} fits the downstream network.")
    target.update(new_state)
    module.load_state_dict(target)
    if verbose:
        logger.info(
            "upstream weights from %s: %d loaded, %d adapted %s, %d re-initialised (heads), %d skipped "
            "(prompt, FUSE, heads, unused stems), %d without upstream counterpart %s",
            name,
            len(report["loaded"]),
            len(report["adapted"]),
            report["adapted"],
            len(report["reinitialised"]),
            len(report["skipped"]),
            len(report["missing"]),
            report["missing"],
        )
    return report


# ---------------------------------------------------------------------------------------------- bundle glue
def task_catalog(catalog: TaskCatalog | str | os.PathLike, task: str | int) -> TaskCatalog:
    """The single-task catalog of ``task`` (id 0): ``TaskCatalog.resolve(catalog).select(names=[task])``.

    Args:
        catalog: a catalog, a catalog JSON path or a built-in name (``"demo"``).
        task: the task's name or id in ``catalog``.

    Raises:
        ValueError: unknown task (the message lists the known ones) or a 2D task.
    """
    cat = TaskCatalog.resolve(catalog)
    spec = cat[task]
    if spec.dims != 3:
        raise ValueError(f"task {spec.name!r} is {spec.dims}D; the UniSeg downstream model is 3D.")
    return cat.select(names=[spec.name])


def prepare_task_data(
    catalog: TaskCatalog,
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "eval",
    val_fraction: float = 0.2,
    seed: int = 0,
    num_cases: int | None = None,
    demo_dir: str | os.PathLike | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Training and validation items of the single task of ``catalog``.

    With ``datalist`` (a JSON with ``training``/``validation`` lists, e.g. written by ``uniseg prepare``), its items
    of the task are used (items without ``task`` are taken as the task's). Otherwise the task's MSD folder
    ``<dataset_dir>/<task.dataset>`` (or ``dataset_dir`` itself when it holds ``dataset.json``) is checked and split
    with :func:`uniseg_components.data.prepare` into ``<output_dir>/datalist/``; when that folder is absent and the
    task is a task of the embedded demo catalog, the demo collection for this task is written there first.

    Args:
        catalog: the single-task catalog (see :func:`task_catalog`).
        dataset_dir: folder holding the task's MSD folder, default ``None`` (then ``datalist`` is required).
        datalist: datalist JSON, default ``None``; takes precedence over ``dataset_dir``.
        output_dir: where the generated datalist goes, default ``"eval"``.
        val_fraction: validation fraction of the generated split, default 0.2.
        seed: split seed, default 0.
        num_cases: cases written when the demo collection is built, default ``None`` (the demo's default).
        demo_dir: the only folder the demo collection may be written into, default ``None`` (``dataset_dir``; the
            bundle passes its default ``<bundle_root>/demo_data``, so a mistyped ``--dataset_dir`` is an error).

    Returns:
        ``{"training": [...], "validation": [...]}`` with items ``{"image", "label", "task"}``.
    """
    from ...data import load_datalist, prepare

    if len(catalog) != 1:
        raise ValueError(f"prepare_task_data needs a single-task catalog, got tasks {catalog.names}.")
    task = catalog[0]
    if datalist:
        train, val, _ = load_datalist(datalist)
        out: dict[str, list[dict[str, Any]]] = {}
        for section, items in (("training", train), ("validation", val)):
            out[section] = [{**it, "task": task.name} for it in items if it.get("task", task.name) == task.name]
        if not out["training"]:
            raise ValueError(f"datalist {str(datalist)!r} has no training item of task {task.name!r}.")
        return out
    if not dataset_dir:
        raise ValueError("give a dataset_dir (MSD folders) or a datalist.")
    root = Path(dataset_dir)
    folder = root if (root / "dataset.json").is_file() else root / (task.dataset or task.name)
    if not (folder / "dataset.json").is_file():
        from ...demo import DEMO_CATALOG, write_demo_collection

        demo_here = demo_dir is None or root.resolve() == Path(demo_dir).resolve()
        if task.name not in TaskCatalog.builtin(DEMO_CATALOG).names or not demo_here:
            raise FileNotFoundError(
                f"no MSD folder for task {task.name!r} at {str(folder)!r} (expected dataset.json there)"
                + ("" if demo_here else f"; the demo data is written only into {str(demo_dir)!r}")
                + "."
            )
        logger.info("writing the demo collection for task %s into %s", task.name, root)
        write_demo_collection(root, tasks=[task.name], num_cases=num_cases)
        folder = root / (task.dataset or task.name)
    dl = prepare([folder], catalog, Path(output_dir) / "datalist", val_fraction=val_fraction, seed=seed)
    train, val, _ = load_datalist(dl)
    return {"training": train, "validation": val}


def inference_items(
    images: str | os.PathLike | list[str] | None,
    catalog: TaskCatalog,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "eval",
    demo_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Inference items ``{"image": path, "task": name}`` of the single task of ``catalog``.

    Args:
        images: a folder (its ``*.nii``/``*.nii.gz`` files, sorted), one image file, a list of files, or
            ``None``/``""`` for the held-out validation images of the task's data under ``dataset_dir`` (see
            :func:`prepare_task_data`; the demo collection is written when absent).
        catalog: the single-task catalog.
        dataset_dir: used when ``images`` is empty, default ``None``.
        output_dir: where a generated datalist goes, default ``"eval"``.
        demo_dir: see :func:`prepare_task_data`, default ``None``.

    Raises:
        FileNotFoundError: a given path does not exist, or a folder holds no NIfTI file.
    """
    task = catalog[0].name
    if images:
        items = list_images(images, must_exist=True)
    else:
        data = prepare_task_data(catalog, dataset_dir=dataset_dir, output_dir=output_dir, demo_dir=demo_dir)
        items = list_images([it["image"] for it in (data["validation"] or data["training"])])
    return [{"image": it["image"], "task": task} for it in items]

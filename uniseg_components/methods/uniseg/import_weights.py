# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``uniseg import-weights``: the authors' released UniSeg checkpoint (yeerwen/UniSeg, an nnU-Net v1 ``.model`` file)
as this project's checkpoint, for ``--pretrained`` of the fine-tune bundle, evaluation and inference.

The authors' ``UniSeg_model`` is nnU-Net v1's ``Generic_UNet`` plus the prompt and the fusion module; its state
dict has these keys (``d`` encoder stage, ``u`` decoder stage from the bottleneck up, ``j`` conv of a stage):

=====================================================================  ============================================
authors' key                                                            this project's key
=====================================================================  ============================================
``conv_blocks_context.0.blocks.0.conv_{1,2,4}.{weight,bias}``            ``backbone.stems.{1,2,4}.*`` (by channels)
``conv_blocks_context.0.blocks.0.instnorm.*``                           ``backbone.stem_norm_act.N.*``
``conv_blocks_context.0.blocks.{j+1}.{conv,instnorm}.*``                ``backbone.encoder.0.{j}.{conv,adn.N}.*``
``conv_blocks_context.{d}.blocks.{j}.*`` (stages 1 to n-2)              ``backbone.encoder.{d}.{j}.*``
``conv_blocks_context.{n-1}.{0.blocks.j | 1.blocks.0}.*`` (bottleneck)  ``backbone.encoder.{n-1}.{j}.*``
``intermedia_prompt``                                                   ``prompt``
``fusion_layer.blocks.{0,1,2}.*``                                       ``fuse.0.0``, ``fuse.0.1``, ``fuse.1``
``tu.{u}.weight``                                                       ``backbone.upsamples.{u}.weight``
``conv_blocks_localization.{u}.{0.blocks.j | 1.blocks.0}.*``            ``backbone.decoder.{u}.{j}.*``
``seg_outputs.{u}.weight``                                              ``backbone.heads.{u}.weight``
=====================================================================  ============================================

nnU-Net orders array axes ``(z, y, x)``, this project (MONAI) ``(x, y, z)``: every kernel and the prompt have
their spatial axes reversed. nnU-Net v1 does not reorient images, MONAI's pipeline turns them to RAS; the networks
were trained with mirroring on every axis, so no flip of the kernels is attempted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...checkpoints import save_checkpoint
from ...tasks import TaskCatalog
from .network import UniSeg

__all__ = ["authors_keys", "convert_authors_state_dict", "read_authors_checkpoint", "import_authors_weights"]

logger = logging.getLogger(__name__)


def _conv(prefix: str, ours: str) -> dict[str, str]:
    """Key pairs of one conv-norm-activation block: ours ``<ours>.conv.*`` / ``<ours>.adn.N.*``, theirs
    ``<prefix>.conv.*`` / ``<prefix>.instnorm.*``."""
    return {
        f"{ours}.conv.weight": f"{prefix}.conv.weight",
        f"{ours}.conv.bias": f"{prefix}.conv.bias",
        f"{ours}.adn.N.weight": f"{prefix}.instnorm.weight",
        f"{ours}.adn.N.bias": f"{prefix}.instnorm.bias",
    }


def authors_keys(net: UniSeg) -> dict[str, str]:
    """This network's state-dict key -> the authors' key holding the same tensor (see the module docstring).

    Raises:
        ValueError: the network's plan is not one the authors' layout can hold (one decoder conv per stage...).
    """
    plan = net.plan
    n, n_conv, n_dec = len(plan.features), plan.n_conv_per_stage, plan.n_conv_per_stage_decoder
    if n_conv < 2 or n_dec < 2:
        raise ValueError(f"the authors' layout has at least 2 convs per stage; this plan has {n_conv} / {n_dec}.")
    keys: dict[str, str] = {"prompt": "intermedia_prompt"}
    for c in net.backbone.in_channels:
        for p in ("weight", "bias"):
            keys[f"backbone.stems.{c}.{p}"] = f"conv_blocks_context.0.blocks.0.conv_{c}.{p}"
    for p in ("weight", "bias"):
        keys[f"backbone.stem_norm_act.N.{p}"] = f"conv_blocks_context.0.blocks.0.instnorm.{p}"
    for j in range(n_conv - 1):
        keys.update(_conv(f"conv_blocks_context.0.blocks.{j + 1}", f"backbone.encoder.0.{j}"))
    for d in range(1, n - 1):
        for j in range(n_conv):
            keys.update(_conv(f"conv_blocks_context.{d}.blocks.{j}", f"backbone.encoder.{d}.{j}"))
    for j in range(n_conv):
        theirs = f"conv_blocks_context.{n - 1}." + (f"0.blocks.{j}" if j < n_conv - 1 else "1.blocks.0")
        keys.update(_conv(theirs, f"backbone.encoder.{n - 1}.{j}"))
    for u in range(n - 1):
        keys[f"backbone.upsamples.{u}.weight"] = f"tu.{u}.weight"
        keys[f"backbone.heads.{u}.weight"] = f"seg_outputs.{u}.weight"
        for j in range(n_dec):
            theirs = f"conv_blocks_localization.{u}." + (f"0.blocks.{j}" if j < n_dec - 1 else "1.blocks.0")
            keys.update(_conv(theirs, f"backbone.decoder.{u}.{j}"))
    for i, ours in enumerate(("fuse.0.0", "fuse.0.1", "fuse.1")):
        keys.update(_conv(f"fusion_layer.blocks.{i}", ours))
    return keys


def _xyz(t: torch.Tensor) -> torch.Tensor:
    """An nnU-Net tensor with its spatial axes (after the first two) reversed: ``(z, y, x)`` -> ``(x, y, z)``."""
    return t.permute(0, 1, *range(t.ndim - 1, 1, -1)).contiguous() if t.ndim > 3 else t.clone()


def convert_authors_state_dict(theirs: Mapping[str, torch.Tensor], net: UniSeg) -> dict[str, torch.Tensor]:
    """The authors' ``UniSeg_model`` state dict as a state dict of ``net`` (spatial axes reversed, see the module
    docstring). A ``module.`` prefix (``DataParallel``) is dropped.

    Raises:
        ValueError: keys missing or left over, or a tensor whose shape does not fit ``net`` (another plan or task
            count); the message lists them.
    """
    theirs = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in theirs.items()}
    keys = authors_keys(net)
    ours = net.state_dict()
    missing = sorted(t for t in keys.values() if t not in theirs)
    left = sorted(set(theirs) - set(keys.values()))
    out, wrong = {}, []
    for k, t in keys.items():
        if t not in theirs:
            continue
        v = _xyz(theirs[t].detach().to(ours[k].dtype))
        if tuple(v.shape) != tuple(ours[k].shape):
            wrong.append(f"{t} {tuple(theirs[t].shape)} -> {k} {tuple(ours[k].shape)}")
        out[k] = v
    if missing or left or wrong:
        raise ValueError(
            "the checkpoint does not fit UniSeg with this catalog's plan and tasks:"
            + (f"\n  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "")
            + (f"\n  not used: {left[:10]}{' ...' if len(left) > 10 else ''}" if left else "")
            + (f"\n  shapes (theirs z,y,x -> ours x,y,z): {wrong[:10]}" if wrong else "")
        )
    if set(out) != set(ours):
        raise ValueError(f"the mapping leaves network keys unset: {sorted(set(ours) - set(out))[:10]}.")
    return out


def read_authors_checkpoint(path: str | os.PathLike, unsafe: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an nnU-Net v1 ``.model`` file (``{"epoch", "state_dict", "optimizer_state_dict",
    "plot_stuff", ...}``), or of a bare state dict.

    Read with ``torch.load(weights_only=True)`` and numpy's scalar types allowed (nnU-Net stores its training curves
    as numpy numbers); ``unsafe=True`` unpickles anything, for a file you trust that holds other objects.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it cannot be read safely, or holds no state dict; the message names it.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor, named by the numpy that wrote the file:
    allowed: list[Any] = [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    allowed += [np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))]
    try:
        if unsafe:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the message says what to do
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        reason = f"it holds objects of {found.group(1)}" if found else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read with weights_only=True ({reason}); if you trust the file, pass "
            "--unsafe."
        ) from e
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict ('state_dict' of tensors).")
    return dict(state)


def import_authors_weights(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    catalog: str | os.PathLike | TaskCatalog = "uniseg_11tasks",
    unsafe: bool = False,
) -> Path:
    """Convert the authors' UniSeg checkpoint to this project's checkpoint (weights, network config, catalog and
    checksum, written atomically), loadable by ``evaluate``, ``infer`` and the fine-tune bundle's ``--pretrained``.

    Args:
        checkpoint: the authors' ``.model`` file (or a bare state dict).
        out: the checkpoint to write, e.g. ``model.pt``.
        catalog: the tasks the weights were trained on, in the authors' task-id order, default ``"uniseg_11tasks"``
            (their 11 upstream tasks and plan).
        unsafe: unpickle anything (see :func:`read_authors_checkpoint`), default ``False``.

    Raises:
        FileNotFoundError, ValueError: an unreadable checkpoint, or one that does not fit the catalog's network.
    """
    catalog = TaskCatalog.resolve(catalog)
    net = UniSeg.from_catalog(catalog)
    state = convert_authors_state_dict(read_authors_checkpoint(checkpoint, unsafe=unsafe), net)
    net.load_state_dict(state, strict=True)
    path = save_checkpoint(out, net, catalog, source=str(checkpoint))
    logger.info("import-weights: %d tensors of %s -> %s (catalog %r)", len(state), checkpoint, path, catalog.name)
    return path

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes (Gao et al., CVPR 2024, arXiv 2306.02416): the unit.

* ``network.py``: :class:`Hermes` (task and modality prior tokens, two-way prior fusion at the deep stages,
  posterior prototypes -> one sigmoid mask per target, modality head).
* ``loss.py``: :class:`HermesLoss`, masked per-target BCE + Dice on each sample's own targets (partial labels).
* ``inferers.py``: per-target maps -> label maps (:func:`targets_to_label`, :class:`TargetsToLabeld`) and every
  target of several datasets in one pass (:class:`HermesMergedInferer`).
* ``incremental.py``: the lifecycle of adding tasks to a trained model (``configs/add_tasks.json``).
* ``export.py``: TorchScript / ONNX with the request as an input.
* ``benchmark.py``: parameters, step-time ratio, throughput, all targets in one pass.
* ``method.py``: :class:`HermesMethod`, the unit's entry in the method registry.
"""

from __future__ import annotations

from .inferers import HermesMergedInferer, TargetsToLabeld, targets_to_label
from .loss import HermesLoss
from .method import HermesMethod
from .network import Hermes, TwoWayAttentionBlock, default_fusion_stages, hermes_tables

__all__ = [
    "Hermes",
    "TwoWayAttentionBlock",
    "default_fusion_stages",
    "hermes_tables",
    "HermesLoss",
    "HermesMergedInferer",
    "TargetsToLabeld",
    "targets_to_label",
    "HermesMethod",
    "METHOD",
]

#: the unit's entry in :mod:`uniseg_components.methods`
METHOD = HermesMethod()

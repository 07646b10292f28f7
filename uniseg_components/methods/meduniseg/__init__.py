# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg (Ye et al., 2024, arXiv 2410.05905): the unit.

* ``network.py``: :class:`MedUniSeg` (one model for 2D and 3D tasks: 2D images run on the in-plane part of the 3D
  kernels through a weightless 2D twin; modal prompts + :class:`MMap`; task prompt + FUSE).
* ``star.py`` and ``relearn.py``: MedUniSeg*, the relearning lifecycle (:class:`MedUniSegStar`: frozen model plus
  per-task decoder adapters; choosing tasks by name or Dice; ``configs/relearn.json``).
* ``export.py``: :class:`MedUniSegExportable`, one trace per channel count and task patch.
* ``benchmark.py``: parameters against one nnU-Net per task, 2D and 3D step ratios and throughput.
* ``method.py``: :class:`MedUniSegMethod`, the unit's entry in the method registry.
"""

from __future__ import annotations

from .export import MedUniSegExportable
from .method import MedUniSegMethod
from .network import MedUniSeg, MMap
from .star import DecoderAdapter, MedUniSegStar

__all__ = ["MedUniSeg", "MMap", "MedUniSegStar", "DecoderAdapter", "MedUniSegExportable", "MedUniSegMethod", "METHOD"]

#: the unit's entry in :mod:`uniseg_components.methods`
METHOD = MedUniSegMethod()

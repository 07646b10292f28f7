# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""UniSeg (Ye et al., MICCAI 2023, arXiv 2304.03493): the unit.

* ``network.py``: :class:`UniSeg` (universal prompt + FUSE -> task prompt at the decoder input, shared heads
  sliced per task, all-tasks path).
* ``downstream.py`` and ``finetune.py``: the fine-tuning lifecycle, :class:`UniSegDownstream` and the weight transfer
  from an upstream checkpoint (``bundles/uniseg_finetune_segmentation``).
* ``export.py``: :class:`UniSegExportable`, the traceable form with the task id as an input.
* ``benchmark.py``: parameters, step-time ratio against the plain backbone, all-tasks ratio, throughput.
* ``method.py``: :class:`UniSegMethod`, the unit's entry in the method registry.

The loss (``losses.TaskDiceCELoss``) and the all-tasks inferer (``inferers.MergedTasksInferer``) are shared with
MedUniSeg and live in the core.
"""

from __future__ import annotations

from .downstream import UniSegDownstream
from .export import UniSegExportable
from .method import UniSegMethod
from .network import UniSeg

__all__ = ["UniSeg", "UniSegDownstream", "UniSegExportable", "UniSegMethod", "METHOD"]

#: the unit's entry in :mod:`uniseg_components.methods`
METHOD = UniSegMethod()

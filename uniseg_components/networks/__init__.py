# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Networks: the shared plan-driven backbone and the prompt-driven universal models."""

from __future__ import annotations

from .backbone import UNetBackbone
from .downstream import UniSegDownstream
from .hermes import Hermes, TwoWayAttentionBlock, default_fusion_stages, hermes_tables
from .meduniseg import DecoderAdapter, MedUniSeg, MedUniSegStar, MMap
from .plans import UNetPlan, auto_plan, plan_from_catalog
from .uniseg import FusePromptModule, UniSeg, task_index

__all__ = [
    "UNetBackbone",
    "UNetPlan",
    "auto_plan",
    "plan_from_catalog",
    "FusePromptModule",
    "UniSeg",
    "task_index",
    "UniSegDownstream",
    "MedUniSeg",
    "MedUniSegStar",
    "MMap",
    "DecoderAdapter",
    "Hermes",
    "TwoWayAttentionBlock",
    "hermes_tables",
    "default_fusion_stages",
]

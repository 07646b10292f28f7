# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The shared core of every method's network: the plan-driven backbone, its plans and building blocks.

The methods' own networks (UniSeg, MedUniSeg, Hermes...) live in their units under
:mod:`uniseg_components.methods`.
"""

from __future__ import annotations

from .backbone import UNetBackbone
from .blocks import DefaultTask, FusePromptModule, task_index
from .plans import UNetPlan, auto_plan, plan_from_catalog

__all__ = [
    "UNetBackbone",
    "UNetPlan",
    "auto_plan",
    "plan_from_catalog",
    "FusePromptModule",
    "task_index",
    "DefaultTask",
]

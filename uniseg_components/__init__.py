# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Prompt-driven universal medical image segmentation components for MONAI."""

from __future__ import annotations

__version__ = "0.1.0"

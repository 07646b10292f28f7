# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Pictures of results: quick-looks of segmentations (image slices with ground-truth and prediction outlines side by
side) and bar charts of Dice tables, written as PNG with matplotlib (no display needed: the Agg canvas).

* :func:`pick_slice` / :class:`QuickLookCase`: one case reduced to the 2D slice that shows its structures.
* :func:`write_quicklook`: one PNG of a few cases of a task, one row per case: ground truth | prediction.
* :func:`write_dice_chart`: one PNG bar chart of mean Dice per task for several methods.

Outlines are drawn in one colour per class (:data:`CLASS_COLOURS`, class 1 first), the same in both columns, so a
reader compares shapes, not colours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CLASS_COLOURS", "QuickLookCase", "pick_slice", "ForegroundSlices", "write_quicklook", "write_dice_chart"]

#: outline colour of class 1, 2, ... (RGB in [0, 1]); pure hues, told apart on a grey image
CLASS_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.4, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
)


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class QuickLookCase:
    """One case as a quick-look shows it: 2D arrays of the same shape (rows x columns as drawn).

    Attributes:
        name: the case's name (the image file's), shown as the row title.
        image: the first image channel on the slice, float.
        label: ground-truth class indices on the slice, int.
        pred: predicted class indices on the slice, int.
        slice_index: which slice of the volume (``None`` for a 2D image).
        dice: the case's Dice per foreground class, for the row title, default ``None``.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    slice_index: int | None = None
    dice: Sequence[float] | None = None

    @classmethod
    def from_volumes(
        cls, name: str, image: Any, label: Any, pred: Any, dice: Sequence[float] | None = None
    ) -> QuickLookCase:
        """The slice of a case that shows its structures (:func:`pick_slice`).

        Args:
            name: case name.
            image: ``(C, H, W[, D])`` image (channel first; the first channel is shown).
            label: ``(1, H, W[, D])`` or ``(H, W[, D])`` ground-truth class indices.
            pred: the prediction, same shape as ``label``.
            dice: Dice per foreground class, default ``None``.

        Raises:
            ValueError: the shapes do not fit one another.
        """
        img, lab, prd = _array(image), _array(label), _array(pred)
        lab = lab[0] if lab.ndim == img.ndim else lab
        prd = prd[0] if prd.ndim == img.ndim else prd
        img = img[0]
        if not (img.shape == lab.shape == prd.shape) or img.ndim not in (2, 3):
            raise ValueError(
                f"quick-look of {name!r}: image {tuple(img.shape)}, label {tuple(lab.shape)} and prediction "
                f"{tuple(prd.shape)} must be the same 2D or 3D grid."
            )
        index = None
        if img.ndim == 3:
            index = pick_slice(lab, prd)
            img, lab, prd = img[..., index], lab[..., index], prd[..., index]
        # drawn with rows = the second array axis (bottom to top), columns = the first: no reorientation, so an
        # image stored in RAS order shows anterior up and the patient's right on the right
        return cls(
            name=name,
            image=img.astype(np.float32).T,
            label=np.rint(lab).astype(np.int16).T,
            pred=np.rint(prd).astype(np.int16).T,
            slice_index=index,
            dice=None if dice is None else [float(d) for d in dice],
        )


def pick_slice(label: np.ndarray, pred: np.ndarray | None = None) -> int:
    """The index along the last axis with the most ground-truth foreground; the most predicted foreground when the
    label is empty; the middle slice when both are.

    Args:
        label: ``(H, W, D)`` class indices.
        pred: ``(H, W, D)`` class indices, default ``None``.
    """
    for volume in (label, pred):
        if volume is None:
            continue
        per_slice = (np.asarray(volume) > 0).reshape(-1, volume.shape[-1]).sum(0)
        if per_slice.any():
            return int(per_slice.argmax())
    return int(label.shape[-1] // 2)


class ForegroundSlices:
    """``batch_transform`` / ``output_transform`` of MONAI's ``TensorBoardImageHandler`` that keeps a few slices: the
    ``keys`` of the first item of a decollated batch (a list of dicts, or one dict), each cut to the ``frames``
    slices along the last axis centred on the slice with the most ``label_key`` foreground (:func:`pick_slice`).
    The handler writes a 3D image as an animated GIF of all its slices; a few keep each logged validation small.
    2D items are returned whole.

    Args:
        keys: the item keys to return, e.g. ``["image", "label"]`` (the handler's ``batch_transform``) or
            ``["pred"]`` (its ``output_transform``).
        frames: slices kept, default 8.
        label_key: the key whose foreground chooses the slices, default ``"label"`` (the validation outputs carry
            it too, so image, label and prediction show the same slices).

    Returns (when called):
        one list per key (a tuple of lists for several keys, the list itself for one), holding the first item's
        ``(C, H, W, frames)`` array.
    """

    def __init__(self, keys: Sequence[str], frames: int = 8, label_key: str = "label") -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}.")
        self.keys, self.frames, self.label_key = list(keys), int(frames), label_key

    def __call__(self, data: Any) -> Any:
        item = data[0] if isinstance(data, (list, tuple)) else data
        label = _array(item[self.label_key]) if self.label_key in item else None
        centre = pick_slice(label.reshape(-1, *label.shape[-3:])[0]) if label is not None else None
        out = []
        for k in self.keys:
            x = _array(item[k])
            if x.ndim == 4 and x.shape[-1] > self.frames:
                middle = x.shape[-1] // 2 if centre is None else centre
                start = min(max(0, middle - self.frames // 2), x.shape[-1] - self.frames)
                x = x[..., start : start + self.frames]
            out.append([x])
        return out[0] if len(out) == 1 else tuple(out)


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas (no display, no global pyplot state), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG through a temporary file, then rename: never a half-written picture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _outline(ax: Any, labels: np.ndarray, num_classes: int) -> list[int]:
    """Draw the outline of each class 1..num_classes-1 of ``labels``; returns the number of outline vertices drawn
    per class."""
    drawn = []
    for c in range(1, num_classes):
        mask = (labels == c).astype(np.float32)
        if not mask.any():
            drawn.append(0)
            continue
        colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
        # pad so that a structure touching the border still gets a closed outline
        rows, cols = np.arange(-1, mask.shape[0] + 1), np.arange(-1, mask.shape[1] + 1)
        cs = ax.contour(cols, rows, np.pad(mask, 1), levels=[0.5], colors=[colour], linewidths=1.5)
        drawn.append(int(sum(len(seg) for seg in cs.allsegs[0])))
    return drawn


def write_quicklook(
    cases: Sequence[QuickLookCase], path: str | os.PathLike, class_names: Sequence[str], title: str = ""
) -> dict[str, Any]:
    """One PNG of ``cases``, a row each: the image slice with the ground-truth outlines (left) and with the
    prediction's (right), one colour per class (:data:`CLASS_COLOURS`) and a legend.

    Args:
        cases: the rows (:meth:`QuickLookCase.from_volumes`).
        path: the PNG to write (folders are made; written whole or not at all).
        class_names: the task's class names, background first.
        title: figure title, default none.

    Returns:
        ``{"path", "cases": [{"name", "slice", "label_outline": [vertices per class], "pred_outline": [...]}]}``.

    Raises:
        ValueError: no case.
    """
    if not cases:
        raise ValueError(f"quick-look {str(path)!r}: no case to show.")
    from matplotlib.lines import Line2D

    n = len(class_names)
    fig = _figure(8.0, 3.6 * len(cases) + (0.6 if title else 0.2))
    axes = fig.subplots(len(cases), 2, squeeze=False)
    info = []
    for row, case in zip(axes, cases):
        lo, hi = np.percentile(case.image, [0.5, 99.5]) if case.image.size else (0.0, 1.0)
        drawn = {}
        for ax, key in zip(row, ("label", "pred")):
            vmax = hi if hi > lo else lo + 1
            ax.imshow(case.image, cmap="gray", vmin=lo, vmax=vmax, interpolation="nearest", origin="lower")
            drawn[key] = _outline(ax, getattr(case, key), n)
            ax.set_xlim(-0.5, case.image.shape[1] - 0.5)
            ax.set_ylim(-0.5, case.image.shape[0] - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        where = "" if case.slice_index is None else f", slice {case.slice_index}"
        row[0].set_title(f"{case.name}{where}: ground truth", fontsize=9)
        dice = "" if case.dice is None else " (Dice " + ", ".join(f"{d:.2f}" for d in case.dice) + ")"
        row[1].set_title(f"prediction{dice}", fontsize=9)
        info.append(
            {
                "name": case.name,
                "slice": case.slice_index,
                "label_outline": drawn["label"],
                "pred_outline": drawn["pred"],
            }
        )
    handles = [
        Line2D([0], [0], color=CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)], lw=2, label=class_names[c])
        for c in range(1, n)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return {"path": str(_save(fig, path)), "cases": info}


def write_dice_chart(
    dice: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike, title: str = "", ylabel: str = "Dice"
) -> Path:
    """A grouped bar chart: one group per task, one bar per method, the value printed on each bar.

    Args:
        dice: method -> task -> mean Dice (``None`` or missing: the method has no such task, no bar).
        path: the PNG to write.
        title: chart title, default none.
        ylabel: default ``"Dice"``.

    Raises:
        ValueError: no method or no task.
    """
    methods = list(dice)
    tasks = list(dict.fromkeys(t for m in methods for t in dice[m]))
    if not methods or not tasks:
        raise ValueError(f"Dice chart {str(path)!r}: no method or no task to show.")
    fig = _figure(max(6.0, 1.2 + 1.1 * len(tasks) * max(1, len(methods)) / 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(methods)
    x = np.arange(len(tasks))
    for i, m in enumerate(methods):
        values = [dice[m].get(t) for t in tasks]
        heights = [np.nan if v is None else float(v) for v in values]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=m)
        for b, v in zip(bars, values):
            if v is not None:
                ax.text(
                    b.get_x() + b.get_width() / 2, float(v) + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7
                )
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=15 if len(tasks) > 4 else 0)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, ncol=min(4, len(methods)), loc="upper right")
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)

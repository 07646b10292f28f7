# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Task catalog: the one source of truth for the tasks a universal model is trained on.

A :class:`TaskSpec` describes one segmentation task (one partially labelled dataset); a :class:`TaskCatalog`
holds a dense, validated list of them plus the network plan. Networks, transforms, samplers, losses and
inferers receive the numbers they need from the catalog, so adding a task means adding an entry to the
catalog JSON, with no code edits.

Axis order: ``spacing`` and ``patch_size`` follow MONAI's array order after ``Orientationd("RAS")``, that is
``(x, y, z)`` for 3D and ``(x, y)`` for 2D. The UniSeg paper writes the same patch as ``z x y x x = 64 x 192 x
192``; here it is ``(192, 192, 64)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .io import read_json, write_json

__all__ = [
    "MODALITIES",
    "TaskSpec",
    "TaskCatalog",
    "UnknownTaskError",
    "normalization_of",
]

#: Known modality names and the intensity normalisation each gets (see ``transforms.NormalizeModalityd``).
#: ``"ct"``: clip to [-325, 325] HU then scale to [0, 1] (UniSeg's window); ``"zscore"``: per-volume z-score.
MODALITIES: dict[str, str] = {
    "CT": "ct",
    "PET": "zscore",
    "MR": "zscore",
    "T1": "zscore",
    "T1c": "zscore",
    "T2": "zscore",
    "FLAIR": "zscore",
    "ADC": "zscore",
    "DWI": "zscore",
    "US": "zscore",
    "XR": "zscore",
    "Dermoscopy": "zscore",
    "Endoscopy": "zscore",
    "Fundus": "zscore",
    "Histology": "zscore",
}


def normalization_of(modality: str) -> str:
    """Return the normalisation scheme (``"ct"`` or ``"zscore"``) of a modality name.

    Raises:
        ValueError: when ``modality`` is not in :data:`MODALITIES`.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(MODALITIES)}.")
    return MODALITIES[modality]


class UnknownTaskError(KeyError, ValueError):
    """Raised when a task name or id is not in the catalog. Subclasses both ``KeyError`` and ``ValueError``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TaskSpec:
    """One segmentation task of a catalog.

    Args:
        name: unique task name, used in datalists (``"task"`` key), on the command line and in reports.
        id: integer task id, dense from 0; selects the task prompt and the output slice.
        dims: spatial dimensions of the task's images, 2 or 3.
        modalities: modality of each input channel, e.g. ``["CT"]``, ``["CT", "PET"]``,
            ``["T1", "T1c", "T2", "FLAIR"]``; names from :data:`MODALITIES`.
        labels: class names, index 0 is the background; at least one foreground class.
        spacing: target voxel spacing in mm, MONAI axis order, length ``dims``.
        patch_size: training patch in voxels, MONAI axis order, length ``dims``.
        dataset: name of the dataset folder (MSD format) that holds the task's images, default ``""``.
        label_offset: offset added to this task's foreground labels in a merged all-task label map; ``None``
            (default) lets the catalog assign consecutive offsets in id order.
        description: free text, default ``""``.
        ct_window: ``(low, high)`` HU range CT channels are clipped to, default ``None`` = UniSeg's [-325, 325].
        ct_zscore: ``(mean, std)``: after clipping, CT channels are z-scored with these (nnU-Net's CT scheme, the
            statistics of the foreground voxels of the training set: ``uniseg plan --ct_normalization foreground``
            writes them with ``ct_window`` = their 0.5 and 99.5 percentiles); default ``None`` = scale the window
            linearly to [0, 1] (UniSeg's scheme).
        nonzero_mask: z-score the non-CT channels over the image's non-zero region only (any channel non-zero)
            and set the voxels outside it to 0: nnU-Net's ``use_mask_for_norm``, for data whose background is 0 and
            that is cropped to its non-zero region (skull-stripped BraTS MR); default ``False`` (the whole channel,
            UniSeg's setting).
        sample_weight: weight of each of this task's training cases when the batch sampler draws cases by weight
            (Hermes' dataset weights: a task's share of the samples is its weight times its number of cases);
            default ``1.0``. Task-balanced sampling (UniSeg, MedUniSeg) ignores it.
    """

    name: str
    id: int
    dims: int
    modalities: tuple[str, ...]
    labels: tuple[str, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    dataset: str = ""
    label_offset: int | None = None
    description: str = ""
    ct_window: tuple[float, float] | None = None
    ct_zscore: tuple[float, float] | None = None
    nonzero_mask: bool = False
    sample_weight: float = 1.0

    def __post_init__(self) -> None:
        # normalise sequences to tuples so specs are hashable and compare by value
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if not isinstance(self.nonzero_mask, bool):
            raise ValueError(f"task {self.name!r}: nonzero_mask must be true or false, got {self.nonzero_mask!r}.")
        if isinstance(self.sample_weight, bool) or not isinstance(self.sample_weight, (int, float)):
            raise ValueError(f"task {self.name!r}: sample_weight must be a number, got {self.sample_weight!r}.")
        object.__setattr__(self, "sample_weight", float(self.sample_weight))
        for name in ("ct_window", "ct_zscore"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or len(value) != 2:
                    raise ValueError(f"task {self.name!r}: {name} must be two numbers, got {value!r}.")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        self.validate()

    def validate(self) -> None:
        """Check the spec on its own; raise ``ValueError`` naming the task and the problem."""
        where = f"task {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task names must be non-empty strings, got {self.name!r}.")
        if not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"{where}: id must be a non-negative integer, got {self.id!r}.")
        if self.dims not in (2, 3):
            raise ValueError(f"{where}: dims must be 2 or 3, got {self.dims!r}.")
        if not self.modalities:
            raise ValueError(f"{where}: needs at least one input channel modality.")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ValueError(f"{where}: unknown modality {m!r}; expected one of {sorted(MODALITIES)}.")
        if len(self.labels) < 2:
            raise ValueError(
                f"{where}: needs a background and at least one foreground class, got labels {list(self.labels)}."
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{where}: label names must be unique, got {list(self.labels)}.")
        if len(self.spacing) != self.dims or any(s <= 0 for s in self.spacing):
            raise ValueError(
                f"{where}: spacing must have {self.dims} positive values (one per spatial axis), "
                f"got {list(self.spacing)}."
            )
        if len(self.patch_size) != self.dims or any(p <= 0 for p in self.patch_size):
            raise ValueError(
                f"{where}: patch_size must have {self.dims} positive values (one per spatial axis), "
                f"got {list(self.patch_size)}."
            )
        if self.label_offset is not None and self.label_offset < 0:
            raise ValueError(f"{where}: label_offset must be >= 0, got {self.label_offset}.")
        if (self.ct_window or self.ct_zscore) and "ct" not in {normalization_of(m) for m in self.modalities}:
            raise ValueError(f"{where}: ct_window / ct_zscore are set but the task has no CT channel.")
        if self.ct_window is not None and not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"{where}: ct_window must be (low, high) with low < high, got {list(self.ct_window)}.")
        if self.ct_zscore is not None and not self.ct_zscore[1] > 0:
            raise ValueError(f"{where}: ct_zscore must be (mean, std) with std > 0, got {list(self.ct_zscore)}.")
        if not (math.isfinite(self.sample_weight) and self.sample_weight > 0):
            raise ValueError(f"{where}: sample_weight must be a positive number, got {self.sample_weight}.")

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Number of input channels (one per modality entry)."""
        return len(self.modalities)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Foreground class names (labels without the background)."""
        return self.labels[1:]

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready values; ``ct_window`` / ``ct_zscore`` only when set, ``nonzero_mask`` only when
        true, ``sample_weight`` only when not 1."""
        d = asdict(self)
        if not d["nonzero_mask"]:
            del d["nonzero_mask"]
        if d["sample_weight"] == 1.0:
            del d["sample_weight"]
        for k in ("modalities", "labels", "spacing", "patch_size"):
            d[k] = list(d[k])
        for k in ("ct_window", "ct_zscore"):
            if d[k] is None:
                del d[k]
            else:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"task {d.get('name')!r}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
        missing = {"name", "id", "dims", "modalities", "labels", "spacing", "patch_size"} - set(d)
        if missing:
            raise ValueError(f"task {d.get('name')!r}: missing field(s) {sorted(missing)}.")
        return cls(**d)


@dataclass
class TaskCatalog:
    """A validated, dense list of :class:`TaskSpec` plus the network plan shared by the tasks.

    Args:
        tasks: the task specs; ids must be unique and dense from 0, names unique.
        name: catalog name, default ``""``.
        plan: the network plan as a dict (see ``uniseg_components.networks.plans.UNetPlan``); ``None`` lets the
            networks derive a plan from the tasks' patch sizes and spacings.
        description: free text, default ``""``.

    Example::

        catalog = TaskCatalog.builtin("uniseg_11tasks")
        len(catalog)            # 11
        catalog["prostate"].id  # 8
        catalog[8].name         # "prostate"
    """

    tasks: list[TaskSpec]
    name: str = ""
    plan: dict[str, Any] | None = None
    description: str = ""
    _by_name: dict[str, TaskSpec] = field(init=False, repr=False, compare=False)
    _by_id: dict[int, TaskSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in self.tasks]
        self.validate()
        self.tasks = sorted(self.tasks, key=lambda t: t.id)
        self.tasks = self._with_offsets(self.tasks)
        self._by_name = {t.name: t for t in self.tasks}
        self._by_id = {t.id: t for t in self.tasks}

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check the catalog as a whole; raise ``ValueError`` listing the problem."""
        if not self.tasks:
            raise ValueError(f"catalog {self.name!r} has no tasks.")
        names = [t.name for t in self.tasks]
        dup_names = sorted({n for n in names if names.count(n) > 1})
        if dup_names:
            raise ValueError(f"catalog {self.name!r}: duplicate task name(s) {dup_names}.")
        ids = [t.id for t in self.tasks]
        dup_ids = sorted({i for i in ids if ids.count(i) > 1})
        if dup_ids:
            raise ValueError(f"catalog {self.name!r}: duplicate task id(s) {dup_ids}.")
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(
                f"catalog {self.name!r}: task ids must be dense from 0 to {len(ids) - 1}, got {sorted(ids)}."
            )
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ValueError(f"catalog {self.name!r}: plan must be a JSON object, got {type(self.plan).__name__}.")
        self._check_patches()
        # explicit label offsets must not make two tasks share a merged label value
        used: dict[int, str] = {}
        for t in self._with_offsets(sorted(self.tasks, key=lambda t: t.id)):
            for c in range(1, t.num_classes):
                v = int(t.label_offset) + c  # type: ignore[arg-type]
                if v in used:
                    raise ValueError(
                        f"catalog {self.name!r}: merged label {v} is used by both {used[v]} and "
                        f"{t.name}/{t.labels[c]}; fix the label_offset values."
                    )
                used[v] = f"{t.name}/{t.labels[c]}"

    def _check_patches(self) -> None:
        """Every task's patch must be divisible by the plan's total stride (its in-plane part for 2D tasks), or the
        network cannot take it: raise ``ValueError`` naming the task, the stride and the nearest valid patch."""
        strides = (self.plan or {}).get("strides") if isinstance(self.plan, dict) else None
        if not strides:
            return
        total = [1] * len(strides[0])
        for st in strides:
            total = [t * int(s) for t, s in zip(total, st)]
        for t in self.tasks:
            if t.dims > len(total):
                raise ValueError(f"catalog {self.name!r}: task {t.name!r} is {t.dims}D but the plan is {len(total)}D.")
            ts = total[: t.dims]
            if any(p % s for p, s in zip(t.patch_size, ts)):
                fix = [max(s, (p // s) * s) for p, s in zip(t.patch_size, ts)]
                part = "in-plane total stride" if t.dims < len(total) else "total stride"
                raise ValueError(
                    f"catalog {self.name!r}: task {t.name!r} has patch_size {list(t.patch_size)}, which is not "
                    f"divisible by the plan's {part} {ts} (the product of its strides per axis); use e.g. {fix}."
                )

    @staticmethod
    def _with_offsets(tasks: list[TaskSpec]) -> list[TaskSpec]:
        """Fill missing label offsets with consecutive values in id order."""
        out, nxt = [], 0
        for t in tasks:
            off = nxt if t.label_offset is None else t.label_offset
            if off != t.label_offset:
                t = TaskSpec(**{**t.to_dict(), "label_offset": off})
            nxt = max(nxt, off + t.num_classes - 1)
            out.append(t)
        return out

    # ---------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self.tasks)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except UnknownTaskError:
            return False
        return True

    def __getitem__(self, key: int | str) -> TaskSpec:
        """Look a task up by name, by integer id or by an id written as a string (``"3"``).

        Raises:
            UnknownTaskError: naming the key and the tasks that exist.
        """
        if isinstance(key, TaskSpec):
            key = key.name
        if hasattr(key, "item") and not isinstance(key, str):  # numpy / torch scalars
            key = key.item()  # type: ignore[union-attr]
        if isinstance(key, str):
            if key in self._by_name:
                return self._by_name[key]
            if key.lstrip("-").isdigit():
                key = int(key)
        if isinstance(key, int) and not isinstance(key, bool) and key in self._by_id:
            return self._by_id[key]
        raise UnknownTaskError(
            f"unknown task {key!r} in catalog {self.name!r}; known tasks: "
            + ", ".join(f"{t.id}={t.name}" for t in self.tasks)
            + "."
        )

    def get(self, key: int | str) -> TaskSpec:
        """Same as ``catalog[key]``."""
        return self[key]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> list[int]:
        """Classes per task (background included), in id order."""
        return [t.num_classes for t in self.tasks]

    @property
    def max_classes(self) -> int:
        """The largest class count of any task: the width of the shared segmentation heads."""
        return max(self.num_classes)

    @property
    def channel_counts(self) -> list[int]:
        """Distinct input channel counts, sorted (one input stem per count)."""
        return sorted({t.num_channels for t in self.tasks})

    @property
    def modalities(self) -> list[str]:
        """Distinct modality names in order of first appearance."""
        seen: list[str] = []
        for t in self.tasks:
            for m in t.modalities:
                if m not in seen:
                    seen.append(m)
        return seen

    @property
    def dims(self) -> list[int]:
        """Distinct spatial dimensions present, sorted."""
        return sorted({t.dims for t in self.tasks})

    @property
    def num_merged_labels(self) -> int:
        """Number of labels of the merged all-task label map, background included."""
        return 1 + max(int(t.label_offset) + t.num_classes - 1 for t in self.tasks)  # type: ignore[arg-type]

    def merged_label_names(self) -> dict[int, str]:
        """Merged label value -> ``"task/class"`` (0 -> ``"background"``)."""
        out = {0: "background"}
        for t in self.tasks:
            for c in range(1, t.num_classes):
                out[int(t.label_offset) + c] = f"{t.name}/{t.labels[c]}"  # type: ignore[arg-type]
        return out

    def label_names(self, tasks: Sequence[TaskSpec | str | int], merged: bool = False) -> dict[int, str]:
        """Label value -> name of a label map written by inference (0 -> ``"background"``).

        Args:
            tasks: the tasks segmented (names, ids or specs).
            merged: ``False`` (default): the first task's own classes (``{1: "liver", 2: "tumour"}``); ``True``: the
                merged map of ``tasks``, values with the catalog's offsets, names ``"task/class"``.
        """
        specs = [t if isinstance(t, TaskSpec) else self[t] for t in tasks]
        if not merged:
            return dict(enumerate(specs[0].labels))
        names = {t.name for t in specs}
        return {v: n for v, n in self.merged_label_names().items() if v == 0 or n.split("/")[0] in names}

    def tasks_for_channels(self, modalities: Sequence[str]) -> list[TaskSpec]:
        """Tasks whose input modalities equal ``modalities`` (used by ``--task all``)."""
        return [t for t in self.tasks if list(t.modalities) == list(modalities)]

    def select(self, names: Sequence[str] | None = None, dims: int | None = None) -> TaskCatalog:
        """A new catalog with a subset of tasks, ids re-numbered densely in the old id order.

        Args:
            names: task names to keep, default all.
            dims: keep only tasks of this spatial dimension, default all.
        """
        keep = [self[n] for n in names] if names is not None else list(self.tasks)
        if dims is not None:
            keep = [t for t in keep if t.dims == dims]
        if not keep:
            raise ValueError(f"catalog {self.name!r}: selection names={names} dims={dims} keeps no task.")
        keep = sorted(keep, key=lambda t: t.id)
        new = [TaskSpec(**{**t.to_dict(), "id": i, "label_offset": None}) for i, t in enumerate(keep)]
        return TaskCatalog(new, name=self.name, plan=self.plan, description=self.description)

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "plan": self.plan,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskCatalog:
        if not isinstance(d, dict) or "tasks" not in d:
            raise ValueError("a catalog must be a JSON object with a 'tasks' list.")
        unknown = set(d) - {"name", "description", "plan", "tasks"}
        if unknown:
            raise ValueError(f"catalog: unknown field(s) {sorted(unknown)}.")
        return cls(
            tasks=[TaskSpec.from_dict(t) for t in d["tasks"]],
            name=d.get("name", ""),
            plan=d.get("plan"),
            description=d.get("description", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskCatalog:
        """Load a catalog JSON file; errors name the file."""
        path = Path(path)
        d = read_json(path, "catalog file")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"catalog file {str(path)!r}: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write the catalog as JSON (atomically: a temporary file renamed into place)."""
        return write_json(path, self.to_dict())

    @staticmethod
    def available_builtins() -> list[str]:
        """Names of the catalogs shipped inside the package."""
        root = resources.files(__package__) / "catalogs"
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))

    @classmethod
    def builtin(cls, name: str) -> TaskCatalog:
        """Load a catalog shipped inside the package, e.g. ``"uniseg_11tasks"`` or ``"demo"``."""
        avail = cls.available_builtins()
        if name not in avail:
            raise ValueError(f"unknown built-in catalog {name!r}; available: {avail}.")
        text = (resources.files(__package__) / "catalogs" / f"{name}.json").read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def resolve(cls, catalog: TaskCatalog | str | os.PathLike) -> TaskCatalog:
        """Accept a catalog, a path to a catalog JSON file, or the name of a built-in catalog."""
        if isinstance(catalog, TaskCatalog):
            return catalog
        if isinstance(catalog, (str, os.PathLike)) and (Path(catalog).suffix == ".json" or Path(catalog).is_file()):
            return cls.load(catalog)
        if isinstance(catalog, str) and catalog in cls.available_builtins():
            return cls.builtin(catalog)
        raise ValueError(
            f"catalog {catalog!r} is neither a .json file nor a built-in catalog {cls.available_builtins()}."
        )

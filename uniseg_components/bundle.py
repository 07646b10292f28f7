# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The bundle configs' data glue (``bundles/*/configs/*.json``).

The configs stay declarative: they name MONAI and ``uniseg_components`` components and reach for this module only
to find their data and folders:

* :class:`BundleData` / :func:`ensure_datalist`: find (or build) the datalist and catalog of a bundle run. With no
  datalist given, a ``dataset_dir`` that holds nothing is filled with the embedded demo collection and prepared; a
  ``dataset_dir`` holding MSD folders is prepared; a ``datalist.json`` in it is used as is.
* :func:`items_of_tasks`: the items of some tasks (the new tasks of an incremental run, relearned tasks).
* :func:`bundle_dir`, :func:`find_bundle_root`, :func:`channels_last_kwargs`.

The handlers are in :mod:`uniseg_components.handlers`, the distributed set-up in
:mod:`uniseg_components.distributed`, the pipelines in :mod:`uniseg_components.transforms`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import CATALOG_NAME, DATALIST_NAME, load_datalist, msd_folders, prepare
from .distributed import get_rank, wait_for_file
from .io import as_list
from .tasks import TaskCatalog

__all__ = [
    "BUNDLES_ENV",
    "bundle_dir",
    "DEMO_3D_TASKS",
    "BundleData",
    "items_of_tasks",
    "ensure_datalist",
    "channels_last_kwargs",
    "AMP_DTYPES",
    "amp_kwargs",
    "set_cudnn_benchmark",
    "find_bundle_root",
]

logger = logging.getLogger(__name__)

#: The demo tasks a bundle's default ``dataset_dir`` is filled with (UniSeg is 3D).
DEMO_3D_TASKS = ("abdomen_ct", "brain_mr", "lesion_petct")


def channels_last_kwargs(device: str | torch.device) -> dict[str, Any]:
    """``{"memory_format": torch.channels_last_3d}`` on CPU (oneDNN convolutions are faster), else ``{}``."""
    return {"memory_format": torch.channels_last_3d} if torch.device(device).type == "cpu" else {}


#: the autocast dtypes a config's ``amp_dtype`` may name
AMP_DTYPES = ("float16", "bfloat16")


def amp_kwargs(dtype: str = "float16") -> dict[str, Any]:
    """The engines' ``amp_kwargs`` (``torch.autocast`` arguments) for a config's ``amp_dtype``: ``{"dtype":
    torch.float16}`` (default; with MONAI's gradient scaler) or ``{"dtype": torch.bfloat16}``. AMP itself is on
    where the config's ``amp`` is (CUDA).

    Raises:
        ValueError: a dtype other than ``"float16"`` or ``"bfloat16"``.
    """
    if str(dtype) not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {list(AMP_DTYPES)}, got {dtype!r}.")
    return {"dtype": getattr(torch, str(dtype))}


def set_cudnn_benchmark(enabled: bool = True) -> bool:
    """``torch.backends.cudnn.benchmark = enabled``, and when enabled ``deterministic = False``: cuDNN times its
    convolution algorithms once per input shape and keeps the fastest of all of them, as nnU-Net and UniSeg train
    (right for training's fixed patch and inference's fixed window; GPU runs are then not bit-reproducible).
    ``False``: no autotuning, and cuDNN's determinism as MONAI's ``set_determinism`` (which the configs call before
    this) left it. Returns ``enabled``."""
    torch.backends.cudnn.benchmark = bool(enabled)
    if enabled:
        torch.backends.cudnn.deterministic = False
    return bool(enabled)


#: environment variable naming the folder that holds the bundles (default: ``bundles/`` of this checkout)
BUNDLES_ENV = "UNISEG_BUNDLES"


def bundle_dir(name: str) -> Path:
    """The folder of bundle ``name``: ``$UNISEG_BUNDLES/<name>``, else ``bundles/<name>`` of the checkout this package
    runs from, else the bundle this package is vendored in (a release zip).

    Raises:
        FileNotFoundError: none of them holds ``configs/metadata.json``; the message lists where it looked.
    """
    here = Path(__file__).resolve().parent
    candidates = [Path(os.environ[BUNDLES_ENV]) / name] if os.environ.get(BUNDLES_ENV) else []
    candidates += [here.parent / "bundles" / name, here.parent]
    for c in candidates:
        if (c / "configs" / "metadata.json").is_file() and (c.name == name or c.parent.name == "bundles"):
            return c
    raise FileNotFoundError(
        f"bundle {name!r} not found (looked in {[str(c) for c in candidates]}); run from a checkout of the project or "
        f"set {BUNDLES_ENV} to the folder holding the bundles."
    )


def find_bundle_root(name: str, default: str = ".") -> str:
    """The bundle folder for a config's ``bundle_root``: ``"."`` inside it, ``bundles/<name>`` from the repository root,
    else the bundle's own folder wherever the command runs (:func:`bundle_dir`: this checkout's ``bundles/<name>``, or
    the bundle a release zip vendors the package into), else ``default``. So ``python -m monai.bundle run ...
    --config_file <path>/configs/...`` writes ``models/``, ``eval/`` and the demo data into the bundle folder, never
    into the working directory of an unrelated folder.

    Args:
        name: the bundle's folder name, e.g. ``"uniseg_universal_segmentation"``.
        default: returned when the bundle folder is not found, default ``"."``.
    """
    cwd = Path.cwd()
    if cwd.name == name and (cwd / "configs").is_dir():
        return "."
    candidate = Path("bundles") / name
    if (candidate / "configs").is_dir():
        return str(candidate)
    try:
        return str(bundle_dir(name))
    except FileNotFoundError:
        return default


# ---------------------------------------------------------------------------------------------- data
def ensure_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    catalog: TaskCatalog | str | os.PathLike | None = None,
    num_cases: int | Mapping[str, int] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_tasks: Sequence[str] | None = None,
    demo_catalog: TaskCatalog | str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
) -> tuple[Path, TaskCatalog]:
    """The datalist and catalog of a bundle run; builds them when they are absent.

    * ``datalist`` given: it must exist; the catalog is ``catalog`` or the datalist's own ``catalog`` entry.
    * else ``<dataset_dir>/datalist.json`` exists: it is used.
    * else ``dataset_dir`` holds MSD-format folders (``*/dataset.json``): they are checked and prepared into
      ``dataset_dir`` with ``catalog`` or ``<dataset_dir>/tasks.json``.
    * else ``dataset_dir`` is absent or empty: when it is ``demo_dir`` (the bundle's default data folder), the
      embedded demo collection (``demo_tasks``) is written there and prepared; any other folder is an error (a typo in
      ``--dataset_dir`` must not train on demo data).

    Under ``torch.distributed`` only rank 0 writes; the other ranks wait for the datalist file to appear.

    Args:
        dataset_dir: the data folder (the bundle's ``dataset_dir``).
        datalist: a ``datalist.json`` (``uniseg prepare`` format), default ``None``.
        catalog: a catalog, catalog JSON or built-in name, default ``None`` (the datalist's).
        num_cases: demo cases per task when the demo is written, default ``None`` (the demo's default).
        val_fraction: validation fraction per task when preparing, default 0.2.
        seed: demo and split seed, default 0.
        demo_tasks: demo tasks written into an empty ``dataset_dir``, default ``None`` (:data:`DEMO_3D_TASKS`;
            MedUniSeg's bundle writes every demo task, 2D ones included).
        demo_catalog: the catalog the demo tasks are taken from, default ``None`` (the built-in ``"demo"``); e.g.
            ``"demo_new_tasks"`` for the new dataset of the incremental-learning demo.
        demo_dir: the only folder the demo collection may be written into, default ``None`` (``dataset_dir``
            itself: the Python API's choice; the bundles pass their default ``<bundle_root>/demo_data``).

    Returns:
        ``(datalist_path, catalog)`` with the full catalog (not yet restricted to 3D tasks).

    Raises:
        FileNotFoundError: a given datalist does not exist; ``dataset_dir`` is absent or empty and not ``demo_dir``.
        ValueError: ``dataset_dir`` holds files but neither a datalist nor MSD folders; no catalog can be found.
    """
    root = Path(dataset_dir)
    if datalist is not None:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {str(path)!r} does not exist (given as --datalist).")
    else:
        path = root / DATALIST_NAME
        if not path.is_file():
            if get_rank() == 0:
                demo = root if demo_dir is None else Path(demo_dir)
                _build_datalist(root, catalog, num_cases, val_fraction, seed, demo_tasks, demo_catalog, demo)
            else:
                wait_for_file(path)
    if catalog is None:
        _, _, cat_path = load_datalist(path)
        if cat_path is None:
            raise ValueError(f"datalist {str(path)!r} names no catalog; give one with --catalog (file or built-in).")
        catalog = cat_path
    return path, TaskCatalog.resolve(catalog)


def _build_datalist(
    root: Path,
    catalog: TaskCatalog | str | os.PathLike | None,
    num_cases: int | Mapping[str, int] | None,
    val_fraction: float,
    seed: int,
    demo_tasks: Sequence[str] | None = None,
    demo_catalog: TaskCatalog | str | os.PathLike | None = None,
    demo_dir: Path | None = None,
) -> Path:
    if root.exists() and not root.is_dir():
        raise ValueError(f"dataset_dir {str(root)!r} is not a folder.")
    folders = msd_folders(root) if root.is_dir() else []
    if not folders:
        if root.is_dir() and any(root.iterdir()):
            raise ValueError(
                f"dataset_dir {str(root)!r} holds neither a datalist.json nor MSD-format task folders "
                "(<task>/dataset.json); give --datalist, or an empty/absent --dataset_dir to build the demo data."
            )
        if demo_dir is None or root.resolve() != demo_dir.resolve():
            state = "is empty" if root.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"dataset_dir {str(root)!r} {state}: give a folder of MSD-format datasets (or --datalist); the demo "
                f"data is written only into the default data folder {str(demo_dir)!r}."
            )
        from .demo import DEMO_CATALOG, write_demo_collection

        names = list(DEMO_3D_TASKS if demo_tasks is None else demo_tasks)
        logger.info("building the demo collection (%s) in %s", ", ".join(names), root)
        write_demo_collection(root, seed=seed, num_cases=num_cases, tasks=names, catalog=demo_catalog or DEMO_CATALOG)
        folders = msd_folders(root)
    if catalog is None:
        if not (root / CATALOG_NAME).is_file():
            raise ValueError(
                f"dataset_dir {str(root)!r} has MSD folders but no {CATALOG_NAME}; give --catalog (file or built-in)."
            )
        catalog = root / CATALOG_NAME
    cat = TaskCatalog.resolve(catalog)
    known = {t.dataset for t in cat if t.dataset}
    used = [f for f in folders if f.name in known]
    if not used:
        raise ValueError(f"none of the folders {[f.name for f in folders]} is a dataset of catalog {cat.names}.")
    return prepare(used, cat, root, val_fraction=val_fraction, seed=seed)


def _check_items(items: list[dict[str, Any]], catalog: TaskCatalog, where: str, task: str | None) -> None:
    unknown = sorted({str(it["task"]) for it in items if "task" in it and it["task"] not in catalog})
    if unknown:
        raise ValueError(f"{where}: task(s) {unknown} are not in catalog {catalog.name!r} (tasks {catalog.names}).")
    if task is None and any("task" not in it for it in items):
        raise ValueError(f"{where}: items without a 'task' key; set the bundle's 'task' (--task NAME) as default.")


class BundleData:
    """Datalist, catalog and the training / validation items of a UniSeg bundle run.

    Args:
        dataset_dir: the data folder; see :func:`ensure_datalist` (built from the demo when empty or absent).
        datalist: a datalist JSON, default ``None`` (``<dataset_dir>/datalist.json``, built when absent).
        catalog: catalog override (file or built-in name), default ``None`` (the datalist's).
        dims: keep only tasks of this spatial rank, default 3 (UniSeg); ``None`` keeps all.
        tasks: keep only these task names (a list, or a comma-separated string), default ``None`` (all); e.g. an
            upstream model trained on some tasks of a catalog, to which an incremental run adds the others.
        task: default task for items without a ``task`` key (MONAI Label), default ``None``.
        num_cases: demo cases per task when the demo is built, default ``None``.
        val_fraction: validation fraction when preparing, default 0.2.
        seed: default 0.
        demo_tasks: demo tasks written when the demo is built, default ``None`` (:data:`DEMO_3D_TASKS`).
        demo_catalog: the catalog of ``demo_tasks``, default ``None`` (the built-in ``"demo"``).
        demo_dir: the only folder the demo may be written into, default ``None`` (``dataset_dir``; see
            :func:`ensure_datalist`).

    Attributes:
        datalist: path of the datalist used.
        catalog: the catalog restricted to ``dims`` (ids renumbered densely, as the network is built).
        train, val: items of the catalog's tasks (items of left-out tasks of other ranks are dropped).

    The data is found (or built) on first use of ``datalist``, ``train`` or ``val``; with an explicit ``catalog``,
    ``catalog`` and ``task`` need no data. So a run that brings its own items (MONAI Label overrides
    ``train#dataset#data`` and ``validate#dataset#data``) never touches ``dataset_dir``.

    Raises (on first use):
        ValueError: a datalist item names a task that the catalog does not have, or an unknown ``task``.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        datalist: str | os.PathLike | None = None,
        catalog: TaskCatalog | str | os.PathLike | None = None,
        dims: int | None = 3,
        task: str | int | None = None,
        num_cases: int | Mapping[str, int] | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        tasks: Sequence[str] | str | None = None,
        demo_tasks: Sequence[str] | None = None,
        demo_catalog: TaskCatalog | str | os.PathLike | None = None,
        demo_dir: str | os.PathLike | None = None,
    ) -> None:
        self._args = (dataset_dir, datalist, catalog, num_cases, val_fraction, seed, demo_tasks, demo_catalog, demo_dir)
        self._catalog_arg, self._dims, self._task = catalog, dims, task
        self._names = as_list(tasks) or None

    def _select(self, full: TaskCatalog) -> TaskCatalog:
        cat = full.select(names=self._names, dims=self._dims) if (self._dims is not None or self._names) else full
        if len(cat) == 0:
            raise ValueError(f"catalog {full.name!r} has no {self._dims}D task (tasks {full.names}).")
        dropped = [t.name for t in full if t.name not in cat]
        if dropped:
            logger.info("leaving out task(s) %s (not %sD)", dropped, self._dims)
        return cat

    @functools.cached_property
    def catalog(self) -> TaskCatalog:
        full = TaskCatalog.resolve(self._catalog_arg) if self._catalog_arg is not None else self._source[1]
        return self._select(full)

    @functools.cached_property
    def task(self) -> str | None:
        return None if self._task is None else self.catalog[self._task].name

    @property
    def datalist(self) -> Path:
        return self._source[0]

    @property
    def train(self) -> list[dict[str, Any]]:
        return self._items[0]

    @property
    def val(self) -> list[dict[str, Any]]:
        return self._items[1]

    @functools.cached_property
    def _source(self) -> tuple[Path, TaskCatalog]:
        """``(datalist path, full catalog)``, the datalist built first when needed (:func:`ensure_datalist`)."""
        return ensure_datalist(*self._args)

    @functools.cached_property
    def _items(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        path, full = self._source
        train, val, _ = load_datalist(path)
        for section, items in (("training", train), ("validation", val)):
            _check_items(items, full, f"datalist {str(path)!r} ({section})", self._task)
        cat = self.catalog

        def keep(it: Mapping[str, Any]) -> bool:
            return it.get("task", self.task) in cat

        train, val = [it for it in train if keep(it)], [it for it in val if keep(it)]
        if not train:
            raise ValueError(f"datalist {str(path)!r} has no training item of the tasks {cat.names}.")
        logger.info("data: %s, %d training and %d validation item(s), tasks %s", path, len(train), len(val), cat.names)
        return train, val


def items_of_tasks(
    items: Sequence[Mapping[str, Any]],
    tasks: Sequence[str] | str,
    default_task: str | None = None,
    required: bool = True,
) -> list[dict[str, Any]]:
    """The items whose ``task`` is one of ``tasks`` (e.g. the new tasks' data of an incremental run).

    Args:
        items: datalist items ``{"image", "label"?, "task"?}``.
        tasks: task names to keep (a list, or a comma-separated string).
        default_task: task of items without a ``task`` key, default ``None`` (such items are dropped).
        required: raise when ``items`` is not empty but none is kept, default ``True`` (training data); ``False``
            returns an empty list (an optional validation split).

    Raises:
        ValueError: ``tasks`` is empty, or (``required``) no item belongs to them; the message lists the tasks found.
    """
    names = as_list(tasks)
    if not names:
        raise ValueError("items_of_tasks: no task name given.")
    kept = [dict(it) for it in items if it.get("task", default_task) in names]
    if required and items and not kept:
        found = sorted({str(it.get("task", default_task)) for it in items})
        raise ValueError(f"no item of the task(s) {names} among {len(items)} item(s) (tasks found: {found}).")
    return kept

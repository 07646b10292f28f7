# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The small glue that the MONAI bundle configs call (``bundles/*/configs/*.json``).

The configs stay declarative: they name MONAI and ``uniseg_components`` components and reach for this module
only where a plain component does not exist:

* :class:`BundleData` / :func:`ensure_datalist`: find (or build) the datalist and catalog of a bundle run. With
  no datalist given, a ``dataset_dir`` that holds nothing is filled with the embedded demo collection (3D tasks)
  and prepared; a ``dataset_dir`` holding MSD folders is prepared; a ``datalist.json`` in it is used as is.
* :func:`train_transforms` / :func:`val_transforms`: the package pipelines with a default ``task`` for items
  that carry none (MONAI Label sends ``{"image", "label"}`` items).
* :func:`task_sampler`: the task-balanced batch sampler from the dataset's items.
* :class:`EpochSeedHandler`: ``set_epoch`` of the sampler and a reseed of the random transforms and of torch from
  ``(seed, epoch, rank)`` at every epoch start, so that a resumed run draws what an uninterrupted one draws.
* :class:`AtomicCheckpointSaver`: the full training state at every epoch, written to a temporary file and
  renamed, so that a killed run never leaves a truncated checkpoint; :func:`resume_path` finds it.
* :class:`DiceTableHandler`: the per-task, per-class Dice table after every validation (logged and written).
* :class:`BatchRecorder`: writes which items each rank trained on (tests of the distributed set-up).
* Distributed helpers: :func:`init_distributed` (backend NCCL on CUDA, Gloo on CPU), :func:`distributed_device`,
  :func:`get_rank`, :func:`is_main_process`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader
from monai.transforms import Compose

from . import transforms as _transforms
from .data import CATALOG_NAME, DATALIST_NAME, TaskBalancedBatchSampler, load_datalist, msd_folders, prepare
from .metrics import format_dice_table
from .tasks import TaskCatalog

__all__ = [
    "DEMO_3D_TASKS",
    "BundleData",
    "items_of_tasks",
    "checkpoint_catalog",
    "extended_catalog",
    "ensure_datalist",
    "train_transforms",
    "val_transforms",
    "task_sampler",
    "EpochSeedHandler",
    "AtomicCheckpointSaver",
    "ResumeCheckpointLoader",
    "resume_path",
    "DiceTableHandler",
    "BatchRecorder",
    "distributed_backend",
    "init_distributed",
    "distributed_device",
    "ddp_device_ids",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "channels_last_kwargs",
    "find_bundle_root",
]

logger = logging.getLogger(__name__)

#: The demo tasks a bundle's default ``dataset_dir`` is filled with (UniSeg is 3D).
DEMO_3D_TASKS = ("abdomen_ct", "brain_mr", "lesion_petct")


# ---------------------------------------------------------------------------------------------- distributed
def distributed_backend(device: str | torch.device | None = None) -> str:
    """``"nccl"`` when ``device`` is CUDA (default: when CUDA is available), else ``"gloo"``."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def get_rank() -> int:
    """Rank in the process group, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """World size of the process group, else ``$WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and saves."""
    return get_rank() == 0


def distributed_device() -> torch.device:
    """This process's device: ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def ddp_device_ids(device: str | torch.device) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` on CUDA, ``None`` on CPU."""
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else None


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialise the default process group from torchrun's environment, once.

    The backend follows the device (:func:`distributed_backend`); on CUDA the current device is set to
    ``cuda:$LOCAL_RANK``. Without torchrun's variables (``WORLD_SIZE`` unset) nothing is initialised.

    Args:
        device: default :func:`distributed_device`.
        timeout_s: collective timeout in seconds, default 1800.

    Returns:
        The device of this rank.
    """
    device = torch.device(device) if device is not None else distributed_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend=distributed_backend(device), timeout=timedelta(seconds=timeout_s))
        logger.info(
            "process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), dist.get_backend()
        )
        # Ignite sets up its own view of the group (a collective ``new_group``) the first time it asks for the
        # rank, e.g. inside a CheckpointSaver; handlers are built on some ranks only, so do it here, on all ranks.
        import ignite.distributed as idist

        idist.get_rank()
    return device


def _wait_for(path: Path, timeout_s: float = 3600.0, poll_s: float = 1.0) -> None:
    """Wait until rank 0 has written ``path`` (a file wait, not a collective: config items are built lazily, in
    an order that may differ between ranks, so a barrier here could pair with another rank's DDP broadcast)."""
    import time

    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank {get_rank()}: {str(path)!r} did not appear within {timeout_s:.0f} s.")
        time.sleep(poll_s)


def channels_last_kwargs(device: str | torch.device) -> dict[str, Any]:
    """``{"memory_format": torch.channels_last_3d}`` on CPU (oneDNN convolutions are faster), else ``{}``."""
    return {"memory_format": torch.channels_last_3d} if torch.device(device).type == "cpu" else {}


def find_bundle_root(name: str, default: str = ".") -> str:
    """The bundle folder as seen from the working directory: ``"."`` inside it, ``bundles/<name>`` from the
    repository root, else ``default``. Lets ``python -m monai.bundle run ... --config_file bundles/<name>/...``
    write ``models/``, ``eval/`` and the demo data into the bundle folder without ``--bundle_root``.

    Args:
        name: the bundle's folder name, e.g. ``"uniseg_universal_segmentation"``.
        default: returned when neither matches, default ``"."``.
    """
    cwd = Path.cwd()
    if cwd.name == name and (cwd / "configs").is_dir():
        return "."
    candidate = Path("bundles") / name
    if (candidate / "configs").is_dir():
        return str(candidate)
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
) -> tuple[Path, TaskCatalog]:
    """The datalist and catalog of a bundle run; builds them when they are absent.

    * ``datalist`` given: it must exist; the catalog is ``catalog`` or the datalist's own ``catalog`` entry.
    * else ``<dataset_dir>/datalist.json`` exists: it is used.
    * else ``dataset_dir`` holds MSD-format folders (``*/dataset.json``): they are checked and prepared into
      ``dataset_dir`` with ``catalog`` or ``<dataset_dir>/tasks.json``.
    * else ``dataset_dir`` is absent or empty: the embedded demo collection (``demo_tasks``) is written there and
      prepared.

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

    Returns:
        ``(datalist_path, catalog)`` with the full catalog (not yet restricted to 3D tasks).

    Raises:
        FileNotFoundError: a given datalist does not exist.
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
                _build_datalist(root, catalog, num_cases, val_fraction, seed, demo_tasks, demo_catalog)
            else:
                _wait_for(path)
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

    Attributes:
        datalist: path of the datalist used.
        catalog: the catalog restricted to ``dims`` (ids renumbered densely, as the network is built).
        train, val: items of the catalog's tasks (items of left-out tasks of other ranks are dropped).

    Raises:
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
    ) -> None:
        path, full = ensure_datalist(
            dataset_dir, datalist, catalog, num_cases, val_fraction, seed, demo_tasks, demo_catalog
        )
        names = _task_names(tasks)
        train, val, _ = load_datalist(path)
        for section, items in (("training", train), ("validation", val)):
            _check_items(items, full, f"datalist {str(path)!r} ({section})", task)
        cat = full.select(names=names, dims=dims) if (dims is not None or names is not None) else full
        if len(cat) == 0:
            raise ValueError(f"catalog {full.name!r} has no {dims}D task (tasks {full.names}).")
        self.task = None if task is None else cat[task].name
        dropped = [t.name for t in full if t.name not in cat]
        if dropped:
            logger.info("leaving out task(s) %s (not %sD)", dropped, dims)

        def keep(it: Mapping[str, Any]) -> bool:
            return it.get("task", self.task) in cat

        self.datalist = path
        self.catalog = cat
        self.train = [it for it in train if keep(it)]
        self.val = [it for it in val if keep(it)]
        if not self.train:
            raise ValueError(f"datalist {str(path)!r} has no training item of the tasks {cat.names}.")
        logger.info(
            "data: %s, %d training and %d validation item(s), tasks %s", path, len(self.train), len(self.val), cat.names
        )


def _task_names(tasks: Sequence[str] | str | None) -> list[str] | None:
    if tasks is None or (isinstance(tasks, str) and not tasks.strip()):
        return None
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    return [n for n in names if n] or None


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
    names = _task_names(tasks)
    if not names:
        raise ValueError("items_of_tasks: no task name given.")
    kept = [dict(it) for it in items if it.get("task", default_task) in names]
    if required and items and not kept:
        found = sorted({str(it.get("task", default_task)) for it in items})
        raise ValueError(f"no item of the task(s) {names} among {len(items)} item(s) (tasks found: {found}).")
    return kept


def checkpoint_catalog(checkpoint: str | os.PathLike) -> TaskCatalog:
    """The task catalog stored in a training checkpoint (``{"model", "meta"}``), without building the network.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it stores no catalog.
    """
    from .engines import CheckpointMeta

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (train the upstream model first).")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    meta = CheckpointMeta()
    meta.load_state_dict(obj.get("meta", {}) if isinstance(obj, dict) else {})
    if meta.catalog is None:
        raise ValueError(f"checkpoint {str(path)!r} stores no task catalog (expected a 'meta' entry with one).")
    return meta.catalog


def extended_catalog(
    upstream: TaskCatalog | str | os.PathLike,
    catalog: TaskCatalog | str | os.PathLike,
    new_tasks: Sequence[str] | str | None = None,
) -> TaskCatalog:
    """The catalog of an incremental run: the upstream model's tasks first, unchanged, then the new tasks.

    The upstream tasks keep their ids, label offsets (hence their target ids) and the upstream plan; the new tasks
    (3D tasks of ``catalog`` that the upstream model lacks, or the ones named) follow, numbered after them.

    Args:
        upstream: the upstream catalog, or the upstream checkpoint (``model.pt``) whose stored catalog is used.
        catalog: a catalog holding the new tasks (object, JSON file or built-in name); it may also list the old ones.
        new_tasks: names of the tasks to add (a list or a comma-separated string), default ``None`` (every 3D task
            of ``catalog`` that the upstream model lacks).

    Raises:
        ValueError: a named task is unknown, already upstream or not 3D, or there is no task to add.
    """
    from .tasks import TaskSpec

    if isinstance(upstream, TaskCatalog):
        old = upstream
    elif str(upstream).endswith((".pt", ".pth")):
        old = checkpoint_catalog(upstream)
    else:
        old = TaskCatalog.resolve(upstream)
    source = TaskCatalog.resolve(catalog)
    names = _task_names(new_tasks)
    if names is None:
        names = [t.name for t in source if t.dims == 3 and t.name not in old]
    for n in names:
        if n in old:
            raise ValueError(f"task {n!r} is already a task of the upstream model (tasks {old.names}).")
        if source[n].dims != 3:
            raise ValueError(f"task {n!r} of catalog {source.name!r} is {source[n].dims}D; only 3D tasks can be added.")
    if not names:
        raise ValueError(
            f"catalog {source.name!r} (tasks {source.names}) has no 3D task that the upstream model lacks (it has "
            f"{old.names}); give a catalog with the new tasks."
        )
    # old tasks keep their ids and label offsets (hence their target ids); new ones are numbered after them
    added = [TaskSpec(**{**source[n].to_dict(), "id": len(old) + i, "label_offset": None}) for i, n in enumerate(names)]
    return TaskCatalog(
        list(old) + added, name=f"{old.name}+{'+'.join(names)}", plan=old.plan, description=old.description
    )


def _with_default_task(pipeline: Compose, task: str | int | None) -> Compose:
    if task is not None:
        for t in pipeline.transforms:
            if isinstance(t, _transforms.AttachTaskd):
                t.default = t.catalog[task].name
    return pipeline


def train_transforms(
    catalog: TaskCatalog | str | os.PathLike, augment: bool = True, task: str | int | None = None
) -> Compose:
    """:func:`uniseg_components.transforms.train_transforms` with ``task`` as the default for task-less items.

    Args:
        catalog: the catalog (object, JSON path or built-in name).
        augment: nnU-Net-style augmentation, default ``True``.
        task: default task name or id, default ``None`` (items must carry ``task``).
    """
    return _with_default_task(_transforms.train_transforms(catalog, augment=augment), task)


def val_transforms(catalog: TaskCatalog | str | os.PathLike, task: str | int | None = None) -> Compose:
    """:func:`uniseg_components.transforms.val_transforms` with ``task`` as the default for task-less items."""
    return _with_default_task(_transforms.val_transforms(catalog), task)


def task_sampler(
    items: Sequence[Mapping[str, Any]],
    catalog: TaskCatalog | str | os.PathLike,
    batch_size: int = 2,
    batches_per_task: int = 50,
    seed: int = 0,
    task: str | int | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    mix_tasks: bool = False,
) -> TaskBalancedBatchSampler:
    """A :class:`~uniseg_components.data.TaskBalancedBatchSampler` for the dataset's items.

    Args:
        items: the dataset's ``data`` (``{"image", "label", "task"?}``), in order.
        catalog: the catalog the network is built for.
        batch_size: items per (single-task) batch, default 2.
        batches_per_task: batches of each task per epoch over all ranks, default 50.
        seed: default 0.
        task: task of items without ``task``, default ``None``.
        num_replicas, rank: default the process group's (1 and 0 without one).
        mix_tasks: batches may mix tasks of the same channel count and patch size (Hermes), default ``False``.
    """
    catalog = TaskCatalog.resolve(catalog)
    if task is None and any("task" not in it for it in items):
        raise ValueError("training items without a 'task' key; set the bundle's 'task' (--task NAME) as default.")
    filled = [it if "task" in it else {**it, "task": task} for it in items]
    return TaskBalancedBatchSampler.from_items(
        filled,
        catalog,
        batch_size=batch_size,
        batches_per_task=batches_per_task,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        mix_tasks=mix_tasks,
    )


# ---------------------------------------------------------------------------------------------- handlers
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed drawn from ``(seed, epoch, rank)``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0] & 0x7FFFFFFF)


class EpochSeedHandler:
    """At every ``EPOCH_STARTED``: ``sampler.set_epoch(epoch)`` and reseed the random transforms and torch.

    The seed is :func:`epoch_seed` of ``(seed, epoch, rank)``; torch's generator is reseeded too, so the
    DataLoader's worker seeds follow. An epoch therefore draws the same batches and augmentations whether the
    run started at epoch 1 or resumed from a checkpoint (with the same number of workers).

    Args:
        sampler: an object with ``set_epoch(int)`` (the batch sampler), default ``None``.
        dataset: the training dataset whose transforms to reseed, default ``None``.
        seed: default 0.
    """

    def __init__(self, sampler: Any = None, dataset: Any = None, seed: int = 0) -> None:
        self.sampler, self.dataset, self.seed = sampler, dataset, int(seed)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        s = epoch_seed(self.seed, epoch, get_rank())
        torch.manual_seed(s)
        if self.dataset is not None:
            set_rnd(self.dataset, s)


def _state_of(obj: Any) -> Any:
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        obj = obj.module
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


class AtomicCheckpointSaver:
    """Write ``{name: obj.state_dict()}`` at the end of every epoch, atomically (temporary file + rename).

    A killed run never leaves a truncated file: readers see the previous complete checkpoint or the new one.
    Everything stored must load with ``torch.load(..., weights_only=True)`` (state dicts of modules,
    optimisers, schedulers, Ignite engines, :class:`~uniseg_components.engines.CheckpointMeta`). Networks
    wrapped in ``DistributedDataParallel`` are saved without the ``module.`` prefix.

    Args:
        save_dir: folder, created when missing.
        save_dict: ``{"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer, ...}``.
        filename: default ``"checkpoint_latest.pt"``.
        save_interval: epochs between writes, default 1.
        engine_key: key under which the engine it is attached to is saved (epoch, iteration), default
            ``"trainer"`` (a config cannot name the trainer inside its own handler list); ``None`` skips it.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_latest.pt",
        save_interval: int = 1,
        engine_key: str | None = "trainer",
    ) -> None:
        if not save_dict and not engine_key:
            raise ValueError("AtomicCheckpointSaver needs a non-empty save_dict or an engine_key.")
        if int(save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}.")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.engine_key = engine_key

    def attach(self, engine: Any) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def __call__(self, engine: Any = None) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        obj = {k: _state_of(v) for k, v in self.save_dict.items()}
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        torch.save(obj, tmp)
        os.replace(tmp, self.path)
        logger.info("saved the training state to %s", self.path)
        return self.path


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that also restores the engine it is attached to (under ``engine_key``).

    For ``--resume``: model, optimiser, scheduler and trainer state from :class:`AtomicCheckpointSaver`'s file;
    the trainer then continues at the next epoch (the sampler epoch follows the trainer's).

    Args:
        load_path: the checkpoint.
        load_dict: ``{"model": net, "optimizer": opt, "lr_scheduler": sched, ...}`` (without the engine).
        engine_key: default ``"trainer"``.
        kwargs: other ``CheckpointLoader`` arguments (``map_location``, ``strict``...).
    """

    def __init__(self, load_path: str, load_dict: Mapping[str, Any], engine_key: str = "trainer", **kwargs: Any):
        super().__init__(load_path=load_path, load_dict=dict(load_dict), **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Any) -> None:
        self.load_dict[self.engine_key] = engine
        super().attach(engine)


def resume_path(ckpt_dir: str | os.PathLike, resume: bool | str = True, filename: str = "checkpoint_latest.pt") -> str:
    """The checkpoint a ``--resume`` run loads: ``resume`` itself when it is a path, else ``ckpt_dir/filename``.

    With ``resume`` false the default path is returned unchecked (the loader is then disabled).

    Raises:
        FileNotFoundError: resuming was asked for and the checkpoint does not exist.
    """
    explicit = isinstance(resume, (str, os.PathLike)) and str(resume).lower() not in ("true", "false", "")
    path = Path(resume) if explicit else Path(ckpt_dir) / filename
    if resume and str(resume).lower() != "false" and not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} does not exist (train once without --resume).")
    return str(path)


class DiceTableHandler:
    """After each evaluation, log the per-task, per-class Dice table and write it to ``output_dir``.

    Reads ``engine.state.metric_details[metric_name]`` (written by :class:`~uniseg_components.metrics.TaskDice`).

    Args:
        output_dir: where ``<prefix>.json`` and ``<prefix>.txt`` go, default ``None`` (only logged).
        metric_name: default ``"val_mean_dice"``.
        prefix: file name stem, default ``"dice_per_task"``.
        print_table: print the table to stdout instead of logging it, default ``False``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        metric_name: str = "val_mean_dice",
        prefix: str = "dice_per_task",
        print_table: bool = False,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.metric_name, self.prefix, self.print_table = metric_name, prefix, bool(print_table)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        details = (getattr(engine.state, "metric_details", None) or {}).get(self.metric_name, {})
        table = format_dice_table(details)
        if self.print_table:  # printed instead of logged: the bundle's logging also goes to stdout
            print(table, flush=True)
        else:
            logger.info("validation\n%s", table)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            mean = engine.state.metrics.get(self.metric_name)
            summary = {"mean": None if mean is None else float(mean), "per_task": details}
            (self.output_dir / f"{self.prefix}.json").write_text(json.dumps(summary, indent=4) + "\n")
            (self.output_dir / f"{self.prefix}.txt").write_text(table + "\n")


class BatchRecorder:
    """Append the source files and task of every training batch to ``<output_dir>/batches_rank<r>.jsonl``.

    For checks of the distributed set-up (which rank saw which batches); not needed for training.

    Args:
        output_dir: folder for the files.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, (list, tuple)) else [batch]  # decollated (a list of items) or not
        files: list[str] = []
        tasks: list[Any] = []
        for item in items:
            if not isinstance(item, Mapping):
                continue
            names = (getattr(item.get("image"), "meta", None) or {}).get("filename_or_obj", [])
            files += [str(f) for f in (names if isinstance(names, (list, tuple)) else [names])]
            t = item.get("task", [])
            tasks += list(t) if isinstance(t, (list, tuple)) else [t]
        out = engine.state.output
        out = out[0] if isinstance(out, (list, tuple)) and out else out
        loss = out.get("loss") if isinstance(out, Mapping) else None
        rec = {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "files": files,
            "tasks": [str(t) for t in tasks],
            "loss": None if loss is None else float(loss),
            "lr": float(engine.optimizer.param_groups[0]["lr"]) if getattr(engine, "optimizer", None) else None,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"batches_rank{get_rank()}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Which method for my data? UniSeg, MedUniSeg, Hermes and a single-task baseline trained on the same data for the
same budget, scored on the same held-out cases with the same protocol.

``python -m uniseg_components compare FOLDERS --budget_minutes N`` (or ``--budget_iterations N``):

1. **Data** (``OUT/data``): the catalog (``--catalog``, else the folders' ``tasks.json``, else ``plan``), ``prepare``
   (checked, seeded split), then the tasks that every chosen method segments (UniSeg, Hermes and the single-task
   baseline are 3D; MedUniSeg also 2D): ``OUT/data/tasks.json`` and ``datalist.json``.
2. **Budget**: every method gets the same budget. ``--budget_iterations N``: N training iterations (batches) each.
   ``--budget_minutes M``: M minutes each, turned into iterations by a short timed probe run of that method (its own
   bundle, data and patch), so that each run is a complete run of its bundle's recipe (its learning-rate schedule
   reaches its end) rather than one cut off by the clock. The single-task baseline gets the same total, an equal
   share per task: one network per task (UniSeg's backbone, one head, no prompt: the fine-tune bundle trained from
   scratch, i.e. an nnU-Net-like model).
3. **Training**: each method with its bundle's ``train.json`` (``OUT/runs/<method>``), no validation during
   training; the *final* weights are scored, as the papers do.
4. **Evaluation**: :func:`uniseg_components.workflows.evaluate` of each final checkpoint on the validation cases
   (same protocol for all: Gaussian sliding window, overlap 0.5, ``--mirror`` for all or none), quick-look PNGs per
   task.
5. **Report**: ``OUT/compare.md`` (Dice per task and class of each method, mean over tasks, training wall time,
   iterations, parameters), ``OUT/compare.json`` (the same numbers, as :func:`evaluate` reported them) and
   ``OUT/compare.png`` (bar chart of mean Dice per task).

Everything is resumable: run the same command again after an interruption. Finished runs are kept, an unfinished
training continues from its ``checkpoint_latest.pt`` (its training clock too), and the settings of the first call are
checked against the new ones (a different budget, method list or split is an error that asks for another ``--out``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .benchmark import count_parameters
from .checkpoints import load_checkpoint
from .data import dataset_folders, load_datalist
from .data import prepare as prepare_datalist
from .io import as_list, read_json, write_json, write_text
from .methods import get_method
from .metrics import mean_over_tasks, task_means
from .planning import catalog_for
from .tasks import TaskCatalog
from .visualize import write_dice_chart

__all__ = ["SINGLE", "TrainingClock", "IterationTimer", "iteration_schedule", "compare", "format_compare_table"]

logger = logging.getLogger(__name__)

#: the name of the single-task baseline in ``--methods``
SINGLE = "single"
#: its bundle: UniSeg's downstream network (the backbone, one task, one head) trained from scratch
SINGLE_BUNDLE = "uniseg_finetune_segmentation"
#: the spatial ranks the single-task baseline segments
SINGLE_DIMS = (3,)
#: the settings that must not change between a run and its resumption
_SETUP_KEYS = (
    "datasets", "catalog", "methods", "budget_minutes", "budget_iterations", "epochs", "val_fraction", "seed",
    "mirror", "config",
)  # fmt: skip
#: train.json entries that the comparison sets itself (the budget, the data, the outputs): not for --config
RESERVED_CONFIG = (
    "epochs", "batches_per_task", "num_iterations", "val_interval", "task", "datalist", "catalog", "dataset_dir",
    "bundle_root", "ckpt_dir", "output_dir", "resume", "seed", "validate#dataset#data",
)  # fmt: skip


class IterationTimer:
    """Time an engine's epochs: when each starts, when each iteration ends and when the epoch's handlers are done
    (attach it last: its end-of-epoch time then includes the others', e.g. the checkpoint written every epoch).

    :meth:`costs` splits an epoch's wall time into a cost per iteration (the steady rate between the first and the
    last iteration) and a cost per epoch (the rest: starting the data loader and its first batch, end-of-epoch
    handlers).
    """

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.ends: dict[int, list[float]] = {}
        self.done: dict[int, float] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._stamp, self.starts)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stamp, self.done)

    @staticmethod
    def _stamp(engine: Any, where: dict[int, float]) -> None:
        where[engine.state.epoch] = time.perf_counter()

    def _iteration(self, engine: Any) -> None:
        self.ends.setdefault(engine.state.epoch, []).append(time.perf_counter())

    def costs(self, epoch: int) -> tuple[float, float]:
        """``(seconds per iteration, seconds per epoch besides its iterations)`` of ``epoch``.

        Raises:
            ValueError: the epoch did not complete or ran fewer than 2 iterations.
        """
        ends = self.ends.get(epoch, [])
        if epoch not in self.done or len(ends) < 2:
            raise ValueError(f"epoch {epoch} did not complete with at least 2 iterations.")
        per_iteration = (ends[-1] - ends[0]) / (len(ends) - 1)
        overhead = self.done[epoch] - self.starts[epoch] - per_iteration * len(ends)
        return per_iteration, max(0.0, overhead)


class TrainingClock:
    """The training wall time of a run across interruptions, in ``path`` (JSON ``{"seconds", "iteration",
    "epoch"}``), updated after each epoch (when the latest checkpoint has just been written).

    A resumed run starts from the recorded seconds; time spent after the last completed epoch of an interrupted
    session is not counted (its work is lost too).

    Args:
        path: the JSON file.
        resume: continue the recorded clock, default ``False`` (start at 0).
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path)
        self.base = float(read_json(self.path, "training clock")["seconds"]) if resume and self.path.is_file() else 0.0
        self.t0 = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _start(self, engine: Any) -> None:
        self.t0 = time.perf_counter()

    def _record(self, engine: Any) -> None:
        state = {"seconds": self.seconds, "iteration": engine.state.iteration, "epoch": engine.state.epoch}
        write_json(self.path, state)

    @property
    def seconds(self) -> float:
        return self.base + (time.perf_counter() - self.t0 if self.t0 else 0.0)


def iteration_schedule(iterations: int, num_tasks: int, epochs: int = 10) -> dict[str, int]:
    """Epochs and batches per task for a budget of ``iterations`` batches over ``num_tasks`` tasks (the
    :class:`~uniseg_components.data.TaskBalancedBatchSampler` gives ``batches_per_task * num_tasks`` batches per
    epoch).

    Args:
        iterations: the budget in training iterations (>= 1).
        num_tasks: tasks the run trains on.
        epochs: epochs to spread them over (the learning-rate schedule's steps), default 10; fewer when the budget
            is too small for one batch per task per epoch.

    Returns:
        ``{"epochs", "batches_per_task", "iterations"}``, ``iterations = epochs * batches_per_task * num_tasks``:
        the most epochs (at most ``epochs``: the learning-rate schedule's steps) whose total is within
        ``max(num_tasks, 1%)`` of the budget, else the closest total. A total is a multiple of ``num_tasks``, so it
        can differ from the budget by about ``num_tasks`` iterations; a gap above 5% is logged as a warning.

    Raises:
        ValueError: a budget, task count or epoch count below 1.
    """
    if iterations < 1 or num_tasks < 1 or epochs < 1:
        raise ValueError(
            f"a training budget needs iterations, tasks and epochs >= 1, got {iterations}, {num_tasks}, {epochs}."
        )
    tolerance = max(num_tasks, 0.01 * iterations)
    options = []
    for e in range(epochs, 0, -1):
        per_task = max(1, round(iterations / (num_tasks * e)))
        options.append((abs(e * per_task * num_tasks - iterations), e, per_task))
    gap, e, per_task = next((o for o in options if o[0] <= tolerance), min(options, key=lambda o: (o[0], -o[1])))
    total = e * per_task * num_tasks
    if gap > 0.05 * iterations:
        logger.warning("a budget of %d iterations over %d task(s) becomes %d", iterations, num_tasks, total)
    return {"epochs": e, "batches_per_task": per_task, "iterations": total}


# ---------------------------------------------------------------------------------------------- the runs
class _Run:
    """One training run of the comparison: a method on all tasks, or the single-task baseline on one task."""

    def __init__(self, label: str, method: str, folder: Path, datalist: Path, tasks: Sequence[str], bundle: str | None):
        self.label, self.method, self.folder, self.datalist = label, method, folder, datalist
        self.tasks, self.bundle = list(tasks), bundle


def _train(run: _Run, out: Path, catalog: str, schedule: Mapping[str, int], common: Mapping[str, Any], **kw: Any):
    from . import workflows

    # no validation during training (an empty validation list): the final weights are what is scored
    config: dict[str, Any] = {**common["config"], "validate#dataset#data": []}
    if run.bundle == SINGLE_BUNDLE:
        config["task"] = run.tasks[0]
    return workflows.train(
        run.datalist,
        method=run.method,
        catalog=catalog,
        output_dir=out,
        epochs=schedule["epochs"],
        batches_per_task=schedule["batches_per_task"],
        bundle=run.bundle,
        config=config,
        **{k: v for k, v in common.items() if k != "config"},
        **kw,
    )


def _probe(run: _Run, catalog: str, common: Mapping[str, Any], iterations: int) -> tuple[float, float]:
    """``(seconds per iteration, seconds per epoch besides its iterations)`` of ``run``'s method on its data: two
    short epochs of about ``iterations`` batches in a scratch folder, the second one timed (the first fills the
    cache and warms up)."""
    folder = run.folder / "probe"
    shutil.rmtree(folder, ignore_errors=True)
    timer = IterationTimer()
    per_task = max(1, math.ceil(max(2, iterations) / len(run.tasks)))
    schedule = {"epochs": 2, "batches_per_task": per_task, "iterations": 2 * per_task * len(run.tasks)}
    try:
        _train(run, folder, catalog, schedule, common, handlers=[timer])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return timer.costs(2)


def _budget(run: _Run, catalog: str, setup: Mapping[str, Any], common: Mapping[str, Any], share: float) -> dict:
    """The run's schedule (``budget.json``): from the iteration budget, or from the time budget and a probe."""
    path = run.folder / "budget.json"
    if path.is_file():
        return read_json(path, "budget")
    per_iteration = per_epoch = None
    if setup["budget_iterations"]:
        iterations = int(round(setup["budget_iterations"] * share))
    else:
        per_iteration, per_epoch = _probe(run, catalog, common, setup["probe_iterations"])
        seconds = setup["budget_minutes"] * 60 * share
        iterations = int((seconds - setup["epochs"] * per_epoch) / per_iteration)
        logger.info(
            "%s: %.3f s per iteration + %.2f s per epoch -> %d iterations in %.2f min",
            run.label,
            per_iteration,
            per_epoch,
            iterations,
            seconds / 60,
        )
    schedule: dict[str, Any] = iteration_schedule(max(1, iterations), len(run.tasks), setup["epochs"])
    schedule.update(seconds_per_iteration=per_iteration, seconds_per_epoch=per_epoch, share=share)
    write_json(path, schedule, indent=1)
    return schedule


def _train_run(run: _Run, catalog: str, setup: Mapping[str, Any], common: Mapping[str, Any], share: float) -> dict:
    """Train ``run`` (or continue it); ``training.json`` once finished."""
    done = run.folder / "training.json"
    if done.is_file():
        logger.info("%s: trained before (%s)", run.label, done)
        return read_json(done, "training record")
    schedule = _budget(run, catalog, setup, common, share)
    resume = (run.folder / "model" / "checkpoint_latest.pt").is_file()
    clock = TrainingClock(run.folder / "clock.json", resume=resume)
    logger.info(
        "%s: %s %d iterations (%d epochs x %d batches per task x %d task(s))",
        run.label,
        "continuing," if resume else "training",
        schedule["iterations"],
        schedule["epochs"],
        schedule["batches_per_task"],
        len(run.tasks),
    )
    res = _train(run, run.folder / "model", catalog, schedule, common, resume=resume, handlers=[clock])
    if res["iterations"] != schedule["iterations"]:
        raise RuntimeError(
            f"{run.label}: training ended after {res['iterations']} iterations, {schedule['iterations']} were planned."
        )
    record = {
        "checkpoint": res["final_checkpoint"],
        "iterations": res["iterations"],
        "epochs": res["epochs"],
        "train_seconds": clock.seconds,
        "resumed": resume,
        "parameters": _parameters(res["final_checkpoint"]),
    }
    write_json(done, record, indent=1)
    return record


def _parameters(checkpoint: str | os.PathLike) -> int:
    return int(count_parameters(load_checkpoint(checkpoint)[0]))


def _evaluate_run(run: _Run, record: Mapping[str, Any], setup: Mapping[str, Any], device: Any) -> dict:
    """Score ``run``'s final checkpoint on its held-out cases (``evaluation.json``, quick-looks in ``pictures/``)."""
    from .workflows import evaluate

    done = run.folder / "evaluation.json"
    if done.is_file():
        return read_json(done, "evaluation record")
    t0 = time.time()
    res = evaluate(
        record["checkpoint"], run.datalist, mirror=setup["mirror"], device=device, pictures=run.folder / "pictures"
    )
    res = {k: v for k, v in res.items() if k != "table"}
    res["seconds"] = time.time() - t0
    write_json(done, res, indent=1)
    return res


# ---------------------------------------------------------------------------------------------- data
def _prepare_data(
    folders: Sequence[str], roots: Sequence[str], out: Path, setup: Mapping[str, Any], **plan: Any
) -> tuple[Path, Path, list[str]]:
    """``OUT/data/tasks.json`` and ``datalist.json``: the tasks every method segments, each with training and
    held-out cases (made once; a later call reuses them)."""
    data = out / "data"
    cat_path, dl_path = data / "tasks.json", data / "datalist.json"
    if cat_path.is_file() and dl_path.is_file():
        return cat_path, dl_path, TaskCatalog.resolve(cat_path).names
    full = TaskCatalog.resolve(catalog_for(roots, folders, setup["catalog"], data / "plan", **plan))
    prepared = prepare_datalist(folders, full, data / "all", val_fraction=setup["val_fraction"], seed=setup["seed"])
    train, val, _ = load_datalist(prepared)
    present = {it["task"] for it in train + val}
    methods = setup["methods"]
    dims = set.intersection(*(set(SINGLE_DIMS if m == SINGLE else get_method(m).dims) for m in methods))
    tasks = [t.name for t in full if t.name in present and t.dims in dims]
    left_out = [t for t in full if t.name in present and t.name not in tasks]
    if left_out:
        logger.warning(
            "compare: task(s) %s left out: not every chosen method segments %sD data",
            [t.name for t in left_out],
            "/".join(sorted({str(t.dims) for t in left_out})),
        )
    if not tasks:
        raise ValueError(f"compare: no task of {list(roots)} is segmented by every chosen method {list(methods)}.")
    short = [t for t in tasks if not any(it["task"] == t for it in val) or not any(it["task"] == t for it in train)]
    if short:
        raise ValueError(
            f"compare: task(s) {short} need at least one training and one held-out case (2 or more cases and "
            f"--val_fraction {setup['val_fraction']}); add cases or leave their folders out."
        )
    full.select(names=tasks).save(cat_path)
    items = {
        "training": [it for it in train if it["task"] in tasks],
        "validation": [it for it in val if it["task"] in tasks],
    }
    write_json(dl_path, {"catalog": "tasks.json", **items}, indent=1)
    return cat_path, dl_path, tasks


def _single_datalist(datalist: Path, task: str, path: Path) -> Path:
    """The items of one task: the single-task baseline trains on exactly these and is scored on them (the full
    datalist would make ``evaluate`` warn about every other task's cases)."""
    if not path.is_file():
        train, val, _ = load_datalist(datalist)
        items = {
            "training": [i for i in train if i["task"] == task],
            "validation": [i for i in val if i["task"] == task],
        }
        write_json(path, {"catalog": str((datalist.parent / "tasks.json").resolve()), **items}, indent=1)
    return path


# ---------------------------------------------------------------------------------------------- the report
def _title(method: str) -> str:
    return "single-task" if method == SINGLE else get_method(method).title


def format_compare_table(report: Mapping[str, Any]) -> str:
    """The Markdown table of a comparison report (:func:`compare`'s return value)."""
    methods = list(report["methods"])
    head = ["task", "class", *(_title(m) for m in methods), "all-background"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["baseline"]
    for task in report["tasks"]:
        for cls in base[task]:
            cells = [f"{report['runs'][m]['per_task'][task][cls]:.4f}" for m in methods]
            lines.append(f"| {task} | {cls} | " + " | ".join(cells) + f" | {base[task][cls]:.4f} |")
    means = [f"**{report['runs'][m]['mean']:.4f}**" for m in methods]
    lines.append("| **mean over tasks** | | " + " | ".join(means) + f" | {report['baseline_mean']:.4f} |")

    def wall(r: Mapping[str, Any]) -> str:
        s = r["train_seconds"]
        return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"

    def params(r: Mapping[str, Any]) -> str:
        n = len(r["checkpoints"])
        return f"{r['parameters']:,}" + (f" ({n} networks)" if n > 1 else "")

    rows = [
        ("training wall time", wall),
        ("training iterations", lambda r: str(r["iterations"])),
        ("parameters", params),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | | " + " | ".join(cell(report["runs"][m]) for m in methods) + " | |")
    return "\n".join(lines)


def _summary(method: str, runs: Sequence[tuple[_Run, dict, dict]], tasks: Sequence[str]) -> dict[str, Any]:
    """One method's row of the report from its run(s) (the single-task baseline: one run per task)."""
    per_task: dict[str, dict[str, float]] = {}
    base: dict[str, dict[str, float]] = {}
    for _, _, ev in runs:
        per_task.update(ev["per_task"])
        base.update(ev["baseline_per_task"])
    missing = [t for t in tasks if t not in per_task]
    if missing:
        raise RuntimeError(f"compare: {_title(method)} scored no held-out case of task(s) {missing}.")
    per_task = {t: per_task[t] for t in tasks}
    return {
        "title": _title(method),
        "per_task": per_task,
        "mean": mean_over_tasks(per_task),
        "train_seconds": sum(tr["train_seconds"] for _, tr, _ in runs),
        "evaluation_seconds": sum(ev["seconds"] for _, _, ev in runs),
        "iterations": sum(tr["iterations"] for _, tr, _ in runs),
        "parameters": sum(tr["parameters"] for _, tr, _ in runs),
        "cases": sum(ev["cases"] for _, _, ev in runs),
        "failed": {k: v for _, _, ev in runs for k, v in ev["failed"].items()},
        "checkpoints": [tr["checkpoint"] for _, tr, _ in runs],
        "pictures": {t: p for _, _, ev in runs for t, p in ev["pictures"].items()},
        "baseline_per_task": base,
    }


def compare(
    datasets: Any,
    out: str | os.PathLike = "compare",
    budget_minutes: float | None = None,
    budget_iterations: int | None = None,
    methods: Any = ("uniseg", "meduniseg", "hermes", SINGLE),
    catalog: str | os.PathLike | None = None,
    epochs: int = 10,
    val_fraction: float = 0.2,
    seed: int = 0,
    mirror: bool = False,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    gpu_memory_gb: float = 10.0,
    probe_iterations: int = 20,
) -> dict[str, Any]:
    """Train the chosen methods on the same data for the same budget and score them on the same held-out cases
    (see the module docstring). Resumable: the same call again continues where it stopped.

    Args:
        datasets: MSD v1 / nnU-Net v2 folders (or a folder of them), a list or comma-separated.
        out: output folder, default ``"compare"``.
        budget_minutes: training minutes per method (the single-task baseline: in total over its tasks).
        budget_iterations: training iterations (batches) per method instead (exactly one of the two budgets).
        methods: any of ``uniseg``, ``meduniseg``, ``hermes`` and ``single``, default all four (the table's column
            order).
        catalog: catalog JSON or built-in name; default the folders' ``tasks.json``, else a plan of the data.
        epochs: epochs each run's budget is spread over (the learning-rate schedule's steps), default 10.
        val_fraction: held-out share of each task's cases, in (0, 1), default 0.2.
        seed: split and training seed, default 0.
        mirror: mirroring test-time augmentation in the evaluation of every method, default ``False``.
        device: default CUDA when available.
        num_workers: data-loader workers, default the bundles' (CPU count less 2, at most 16).
        cache_dir: preprocess the cases once into this folder for all runs (see ``train --cache_dir``), default
            none (in RAM).
        config: further train.json entries for every run, e.g. ``{"batch_size": 2, "augment": False}``; not those
            the comparison sets itself (:data:`RESERVED_CONFIG`).
        gpu_memory_gb: GPU memory budget of the plan when the data needs one, default 10.
        probe_iterations: batches of the timed probe epoch of a time budget (after as many untimed ones), default 20;
            more give a closer estimate of the time per iteration, at the probe's cost. Only runs not budgeted yet
            use it.

    Returns:
        the report: ``{"setup", "tasks", "methods", "runs": {method: {"per_task", "mean", "train_seconds",
        "iterations", "parameters", "cases", "failed", "checkpoints", "pictures", ...}}, "baseline",
        "baseline_mean", "table", "files"}``.

    Raises:
        ValueError: no or both budgets, a budget that is not positive (or a fractional iteration budget), an unknown
            or repeated method, a reserved or non-mapping ``config``, a ``val_fraction`` outside (0, 1), no task
            every method segments, a task without a training or a held-out case, or settings that differ from those
            of an earlier call into the same ``out``.
    """
    t0 = time.time()
    names = [m.strip().lower() for m in as_list(methods)]
    for m in names:
        if m != SINGLE:
            get_method(m)  # raises, listing the known methods
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--methods must name each method once, got {names}.")
    if (budget_minutes is None) == (budget_iterations is None):
        raise ValueError("give exactly one of --budget_minutes and --budget_iterations.")
    budget = budget_minutes if budget_minutes is not None else budget_iterations
    if not budget or float(budget) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"the budget must be positive, got {budget}.")
    if budget_iterations is not None and float(budget_iterations) != int(budget_iterations):
        raise ValueError(f"--budget_iterations must be a whole number of iterations, got {budget_iterations}.")
    if not 0 < float(val_fraction) < 1:
        raise ValueError(f"--val_fraction must be in (0, 1): the comparison scores held-out cases, got {val_fraction}.")
    if int(epochs) < 1 or int(probe_iterations) < 1:
        raise ValueError(f"--epochs and --probe_iterations must be >= 1, got {epochs} and {probe_iterations}.")
    config = dict(config or {})
    reserved = sorted(set(config) & set(RESERVED_CONFIG))
    if reserved:
        raise ValueError(f"--config may not set {reserved}: the comparison sets them (budget, data, outputs).")
    out = Path(out).resolve()
    roots = [str(Path(r).resolve()) for r in as_list(datasets)]
    folders = dataset_folders(roots)
    setup: dict[str, Any] = {
        "datasets": folders,
        "catalog": None if not catalog else str(catalog),
        "methods": names,
        "budget_minutes": None if budget_minutes is None else float(budget_minutes),
        "budget_iterations": None if budget_iterations is None else int(budget_iterations),
        "epochs": int(epochs),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "mirror": bool(mirror),
        "config": config,
        "probe_iterations": int(probe_iterations),
    }
    _check_setup(out / "setup.json", setup)
    cat_path, datalist, tasks = _prepare_data(folders, roots, out, setup, gpu_memory_gb=gpu_memory_gb)
    if not (out / "setup.json").is_file():  # written once the data is ready: a failed first call binds nothing
        write_json(out / "setup.json", setup, indent=1)
    common: dict[str, Any] = {"seed": seed, "device": device, "num_workers": num_workers, "config": config}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    results: dict[str, list[tuple[_Run, dict, dict]]] = {}
    for m in names:
        if m == SINGLE:
            runs = [
                _Run(
                    f"single-task {t}",
                    "uniseg",
                    out / "runs" / SINGLE / t,
                    _single_datalist(datalist, t, out / "runs" / SINGLE / t / "datalist.json"),
                    [t],
                    SINGLE_BUNDLE,
                )
                for t in tasks
            ]
        else:
            runs = [_Run(get_method(m).title, m, out / "runs" / m, datalist, tasks, None)]
        share = 1.0 / len(runs)
        results[m] = []
        for run in runs:
            run.folder.mkdir(parents=True, exist_ok=True)
            record = _train_run(run, str(cat_path), setup, common, share)
            evaluation = _evaluate_run(run, record, setup, device)
            logger.info("%s: mean Dice %.4f on %d case(s)", run.label, evaluation["mean"], evaluation["cases"])
            results[m].append((run, record, evaluation))
    summaries = {m: _summary(m, results[m], tasks) for m in names}
    first = summaries[names[0]]
    report: dict[str, Any] = {
        "setup": setup,
        "tasks": tasks,
        "methods": names,
        "runs": summaries,
        "baseline": first["baseline_per_task"],
        "baseline_mean": mean_over_tasks(first["baseline_per_task"]),
        "seconds": time.time() - t0,
    }
    budget_text = (
        f"{setup['budget_iterations']} iterations" if setup["budget_iterations"] else f"{budget_minutes:g} min"
    )
    report["table"] = format_compare_table(report)
    chart = write_dice_chart(
        {_title(m): task_means(summaries[m]["per_task"]) for m in names},
        out / "compare.png",
        title=f"mean Dice per task on held-out cases, {budget_text} of training per method",
    )
    write_text(out / "compare.md", _markdown(report, budget_text, chart))
    report["files"] = {"markdown": str(out / "compare.md"), "json": str(out / "compare.json"), "chart": str(chart)}
    write_json(out / "compare.json", {k: v for k, v in report.items() if k != "table"}, indent=1)
    return report


def _markdown(report: Mapping[str, Any], budget_text: str, chart: Path) -> str:
    """``compare.md``: what was compared and how, the table, the cases any method could not score, the chart."""
    runs, tasks = report["runs"], report["tasks"]
    cases = {m: r["cases"] for m, r in runs.items()}
    scored = next(iter(cases.values()))
    text = (
        f"# Method comparison\n\nTasks {', '.join(tasks)}; budget {budget_text} per method (single-task: in total, "
        f"{len(tasks)} equal shares); final checkpoints scored on {scored} held-out case(s) with the same protocol "
        f"(Gaussian sliding window, overlap 0.5, mirroring {'on' if report['setup']['mirror'] else 'off'}).\n\n"
    )
    text += report["table"] + "\n"
    if len(set(cases.values())) > 1:
        text += f"\n**Warning:** the methods scored different numbers of cases: {cases}.\n"
    for r in runs.values():
        for path, reason in r["failed"].items():
            text += f"\n- {r['title']} could not score `{path}`: {reason}"
    return text + f"\n\n![mean Dice per task]({chart.name})\n"


def _check_setup(path: Path, setup: Mapping[str, Any]) -> None:
    """Refuse settings that differ from those an earlier call wrote to ``path`` (naming them; the methods' order
    does not count); nothing to check on a first call."""
    if not path.is_file():
        return
    before = read_json(path, "comparison settings")

    def same(k: str) -> bool:
        a, b = before.get(k), setup.get(k)
        return sorted(a) == sorted(b) if k == "methods" and a and b else a == b

    changed = [k for k in _SETUP_KEYS if not same(k)]
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {setup.get(k)!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds a comparison with other settings ({diff}); continue it with the same arguments or "
            "give another --out."
        )

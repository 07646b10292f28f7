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

from .checkpoints import load_checkpoint
from .data import dataset_folders, load_datalist
from .data import prepare as prepare_datalist
from .io import as_list, read_json, write_json, write_text
from .methods import get_method
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
_SETUP_KEYS = ("methods", "budget_minutes", "budget_iterations", "epochs", "val_fraction", "seed", "mirror", "tasks")


class IterationTimer:
    """Record when each training iteration of an engine ends (``time.perf_counter``), per epoch.

    ``seconds_per_iteration(epoch)`` is the mean time per iteration of that epoch (its wall time over its
    iterations, data loading included).
    """

    def __init__(self) -> None:
        self.ends: dict[int, list[float]] = {}
        self.starts: dict[int, float] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._end)

    def _start(self, engine: Any) -> None:
        self.starts[engine.state.epoch] = time.perf_counter()

    def _end(self, engine: Any) -> None:
        self.ends.setdefault(engine.state.epoch, []).append(time.perf_counter())

    def seconds_per_iteration(self, epoch: int) -> float:
        """Raises ``ValueError`` when the epoch ran no iteration."""
        if not self.ends.get(epoch):
            raise ValueError(f"epoch {epoch} ran no iteration.")
        return (self.ends[epoch][-1] - self.starts[epoch]) / len(self.ends[epoch])


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
        ``{"epochs", "batches_per_task", "iterations"}``; ``iterations`` (``epochs * batches_per_task * num_tasks``)
        is the budget rounded to what the sampler can give, the same for every run with the same arguments.

    Raises:
        ValueError: a budget, task count or epoch count below 1.
    """
    if iterations < 1 or num_tasks < 1 or epochs < 1:
        raise ValueError(
            f"a training budget needs iterations, tasks and epochs >= 1, got {iterations}, {num_tasks}, {epochs}."
        )
    epochs = max(1, min(epochs, iterations // num_tasks))
    per_task = max(1, round(iterations / (num_tasks * epochs)))
    return {"epochs": epochs, "batches_per_task": per_task, "iterations": epochs * per_task * num_tasks}


# ---------------------------------------------------------------------------------------------- the runs
class _Run:
    """One training run of the comparison: a method on all tasks, or the single-task baseline on one task."""

    def __init__(self, label: str, method: str, folder: Path, datalist: Path, tasks: Sequence[str], bundle: str | None):
        self.label, self.method, self.folder, self.datalist = label, method, folder, datalist
        self.tasks, self.bundle = list(tasks), bundle

    def config(self, schedule: Mapping[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(keyword arguments of :func:`workflows.train`, its ``config``) for a schedule."""
        kwargs: dict[str, Any] = {"epochs": schedule["epochs"]}
        config: dict[str, Any] = {}
        if self.bundle == SINGLE_BUNDLE:  # the fine-tune bundle: one task, "num_iterations" batches per epoch
            config.update(task=self.tasks[0], num_iterations=schedule["batches_per_task"])
        else:
            kwargs["batches_per_task"] = schedule["batches_per_task"]
        return kwargs, config


def _train(run: _Run, out: Path, catalog: str, schedule: Mapping[str, int], common: Mapping[str, Any], **kw: Any):
    from . import workflows

    kwargs, config = run.config(schedule)
    # validate never during training (val_interval beyond the last epoch): the final weights are what is scored
    config.update(common.get("config") or {})
    return workflows.train(
        run.datalist,
        method=run.method,
        catalog=catalog,
        output_dir=out,
        val_interval=schedule["epochs"] + 1,
        bundle=run.bundle,
        config=config,
        **{k: v for k, v in common.items() if k != "config"},
        **kwargs,
        **kw,
    )


def _probe(run: _Run, catalog: str, common: Mapping[str, Any]) -> float:
    """Seconds per training iteration of ``run``'s method on its data: two short epochs in a scratch folder, the
    second one timed (the first fills the cache and warms up)."""
    folder = run.folder / "probe"
    shutil.rmtree(folder, ignore_errors=True)
    timer = IterationTimer()
    per_task = max(1, math.ceil(6 / len(run.tasks)))
    schedule = {"epochs": 2, "batches_per_task": per_task, "iterations": 2 * per_task * len(run.tasks)}
    try:
        _train(run, folder, catalog, schedule, common, handlers=[timer])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return timer.seconds_per_iteration(2)


def _budget(run: _Run, catalog: str, setup: Mapping[str, Any], common: Mapping[str, Any], share: float) -> dict:
    """The run's schedule (``budget.json``): from the iteration budget, or from the time budget and a probe."""
    path = run.folder / "budget.json"
    if path.is_file():
        return read_json(path, "budget")
    if setup["budget_iterations"]:
        iterations, probe = int(round(setup["budget_iterations"] * share)), None
    else:
        probe = _probe(run, catalog, common)
        iterations = max(1, int(setup["budget_minutes"] * 60 * share / probe))
        logger.info("%s: %.3f s per iteration -> %d iterations in %.1f min", run.label, probe, iterations,
                    setup["budget_minutes"] * share)  # fmt: skip
    schedule = iteration_schedule(max(1, iterations), len(run.tasks), setup["epochs"])
    schedule.update(seconds_per_iteration=probe, share=share)
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
    net, _ = load_checkpoint(checkpoint)
    return int(sum(p.numel() for p in net.parameters()))


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
    datasets: Sequence[str], out: Path, catalog: str | None, methods: Sequence[str], setup: dict[str, Any], **plan: Any
) -> tuple[Path, Path, list[str]]:
    """``OUT/data/tasks.json`` and ``datalist.json`` of the tasks every method segments (made once)."""
    data = out / "data"
    cat_path, dl_path = data / "tasks.json", data / "datalist.json"
    if cat_path.is_file() and dl_path.is_file():
        return cat_path, dl_path, TaskCatalog.resolve(cat_path).names
    roots = as_list(datasets)
    folders = dataset_folders(roots)
    full = TaskCatalog.resolve(catalog_for(roots, folders, catalog, data / "plan", **plan))
    prepared = prepare_datalist(folders, full, data / "all", val_fraction=setup["val_fraction"], seed=setup["seed"])
    train, val, _ = load_datalist(prepared)
    present = {it["task"] for it in train}
    dims = set.intersection(*(set(SINGLE_DIMS if m == SINGLE else get_method(m).dims) for m in methods))
    tasks = [t.name for t in full if t.name in present and t.dims in dims]
    left_out = [t.name for t in full if t.name in present and t.name not in tasks]
    if left_out:
        logger.warning("compare: task(s) %s left out: not every chosen method segments %sD data", left_out,
                       "/".join(str(t.dims) for t in full if t.name in left_out))  # fmt: skip
    if not tasks:
        raise ValueError(f"compare: no task of {roots} is segmented by every chosen method {list(methods)}.")
    cat = full.select(names=tasks)
    cat.save(cat_path)
    write_json(
        dl_path,
        {
            "catalog": "tasks.json",
            "training": [it for it in train if it["task"] in tasks],
            "validation": [it for it in val if it["task"] in tasks],
        },
        indent=1,
    )
    return cat_path, dl_path, tasks


def _single_datalist(datalist: Path, task: str, path: Path) -> Path:
    """The items of one task (the single-task baseline trains and is scored on exactly these)."""
    if not path.is_file():
        train, val, _ = load_datalist(datalist)
        items = {
            "training": [i for i in train if i["task"] == task],
            "validation": [i for i in val if i["task"] == task],
        }
        write_json(path, {"catalog": str(datalist.parent / "tasks.json"), **items}, indent=1)
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
        classes = list(base[task])
        for cls in classes:
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
        "mean": sum(sum(c.values()) / len(c) for c in per_task.values()) / len(per_task),
        "train_seconds": sum(tr["train_seconds"] for _, tr, _ in runs),
        "evaluation_seconds": sum(ev["seconds"] for _, _, ev in runs),
        "iterations": sum(tr["iterations"] for _, tr, _ in runs),
        "parameters": sum(tr["parameters"] for _, tr, _ in runs),
        "cases": sum(ev["cases"] for _, _, ev in runs),
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
    config: Mapping[str, Any] | None = None,
    gpu_memory_gb: float = 10.0,
) -> dict[str, Any]:
    """Train the chosen methods on the same data for the same budget and score them on the same held-out cases
    (see the module docstring). Resumable: the same call again continues where it stopped.

    Args:
        datasets: MSD v1 / nnU-Net v2 folders (or a folder of them), a list or comma-separated.
        out: output folder, default ``"compare"``.
        budget_minutes: training minutes per method (the single-task baseline: in total over its tasks).
        budget_iterations: training iterations per method instead (exactly one of the two budgets).
        methods: any of ``uniseg``, ``meduniseg``, ``hermes`` and ``single``, default all four.
        catalog: catalog JSON or built-in name; default the folders' ``tasks.json``, else a plan of the data.
        epochs: epochs each run's budget is spread over (the learning-rate schedule's steps), default 10.
        val_fraction: held-out share of each task's cases, default 0.2.
        seed: split and training seed, default 0.
        mirror: mirroring test-time augmentation in the evaluation of every method, default ``False``.
        device: default CUDA when available.
        num_workers: data-loader workers, default the bundles' (CPU count less 2, at most 16).
        config: further train.json entries for every run (e.g. ``{"batch_size": 2, "augment": false}``).
        gpu_memory_gb: GPU memory budget of the plan when the data needs one, default 10.

    Returns:
        the report: ``{"setup", "tasks", "methods", "runs": {method: {"per_task", "mean", "train_seconds",
        "iterations", "parameters", ...}}, "baseline", "baseline_mean", "table", "files"}``.

    Raises:
        ValueError: no or both budgets, an unknown method, no task every method segments, or settings that differ
            from those of an earlier call into the same ``out``.
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
    if not budget or float(budget) <= 0:
        raise ValueError(f"the budget must be positive, got {budget}.")
    out = Path(out)
    setup: dict[str, Any] = {
        "methods": names,
        "budget_minutes": None if budget_minutes is None else float(budget_minutes),
        "budget_iterations": None if budget_iterations is None else int(budget_iterations),
        "epochs": int(epochs),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "mirror": bool(mirror),
    }
    cat_path, datalist, tasks = _prepare_data(
        as_list(datasets), out, catalog, names, setup, gpu_memory_gb=gpu_memory_gb
    )
    setup["tasks"] = tasks
    _check_setup(out / "setup.json", setup)
    common: dict[str, Any] = {"seed": seed, "device": device, "num_workers": num_workers, "config": dict(config or {})}
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
        "baseline_mean": sum(sum(c.values()) / len(c) for c in first["baseline_per_task"].values()) / len(tasks),
        "seconds": time.time() - t0,
    }
    budget_text = (
        f"{setup['budget_iterations']} iterations" if setup["budget_iterations"] else f"{budget_minutes:g} min"
    )
    report["table"] = format_compare_table(report)
    chart = write_dice_chart(
        {_title(m): {t: sum(c.values()) / len(c) for t, c in summaries[m]["per_task"].items()} for m in names},
        out / "compare.png",
        title=f"mean Dice per task on held-out cases, {budget_text} of training per method",
    )
    header = (
        f"# Method comparison\n\nTasks {', '.join(tasks)}; budget {budget_text} per method (single-task: in total, "
        f"{len(tasks)} equal shares); final checkpoints scored on {first['cases']} held-out case(s) with the same "
        f"protocol (Gaussian sliding window, overlap 0.5, mirroring {'on' if mirror else 'off'}).\n\n"
    )
    write_text(out / "compare.md", header + report["table"] + f"\n\n![mean Dice per task]({chart.name})\n")
    report["files"] = {"markdown": str(out / "compare.md"), "json": str(out / "compare.json"), "chart": str(chart)}
    write_json(out / "compare.json", {k: v for k, v in report.items() if k != "table"}, indent=1)
    return report


def _check_setup(path: Path, setup: Mapping[str, Any]) -> None:
    """Write the settings on the first call; on a later call, refuse different ones (naming them)."""
    if path.is_file():
        before = read_json(path, "comparison settings")
        changed = [k for k in _SETUP_KEYS if before.get(k) != setup.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {setup.get(k)!r}" for k in changed)
            raise ValueError(
                f"{path.parent} holds a comparison with other settings ({diff}); continue it with the same "
                "arguments or give another --out."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(setup), indent=1)

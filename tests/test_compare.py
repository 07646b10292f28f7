# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``compare``: the four methods on the same data and budget, resumable, with a table that is what ``evaluate``
reports; the quick-look and chart pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import outline_pixels

from uniseg_components import workflows
from uniseg_components.checkpoints import load_checkpoint
from uniseg_components.compare import compare, iteration_schedule
from uniseg_components.demo import write_demo_collection
from uniseg_components.visualize import ForegroundSlices, QuickLookCase, pick_slice, write_dice_chart, write_quicklook

METHODS = ["uniseg", "meduniseg", "hermes", "single"]


class _Stop(Exception):
    """What the test raises to interrupt a training run."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two 3D demo tasks and a 2D one (which the 3D-only methods cannot train: left out of the comparison)."""
    root = tmp_path_factory.mktemp("compare")
    folder = write_demo_collection(
        root / "demo",
        tasks=["brain_mr", "lesion_petct", "fetal_us"],
        num_cases={"brain_mr": 4, "lesion_petct": 4, "fetal_us": 3},
    )
    return root, folder


@pytest.fixture(scope="module")
def compared(demo):
    """All four methods for 8 iterations each; Hermes' training interrupted after its first epoch, then the same
    call again (which must continue it and redo nothing else)."""
    torch.set_num_threads(1)
    root, folder = demo
    out = root / "cmp"
    calls: list[dict] = []
    real_train = workflows.train
    stop = {"armed": True}

    def spy(datalist, **kw):
        calls.append({"out": Path(kw["output_dir"]), "resume": kw.get("resume", False)})
        if stop["armed"] and kw.get("method") == "hermes":
            stop["armed"] = False

            class Interrupt:
                def attach(self, engine):
                    from ignite.engine import Events

                    def fire(_):
                        raise _Stop("interrupted after epoch 1")

                    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), fire)

            kw["handlers"] = [*kw.get("handlers", []), Interrupt()]
        return real_train(datalist, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(workflows, "train", spy)
    args = dict(out=out, budget_iterations=8, methods=",".join(METHODS), epochs=2, config={"augment": False}, seed=0)
    try:
        with pytest.raises(_Stop):
            compare(str(folder), **args)
        first = list(calls)
        calls.clear()
        report = compare(str(folder), **args)
    finally:
        mp.undo()
    return {"root": root, "out": out, "report": report, "first": first, "second": calls, "args": args, "demo": folder}


def test_iteration_schedule_gives_every_method_the_same_budget():
    multi = iteration_schedule(120, num_tasks=3, epochs=10)
    assert multi == {"epochs": 10, "batches_per_task": 4, "iterations": 120}
    single = [iteration_schedule(40, num_tasks=1, epochs=10) for _ in range(3)]  # one third each
    assert sum(s["iterations"] for s in single) == multi["iterations"]
    # budgets that do not divide: the closest schedule (a multiple of the task count), never above 10 epochs
    for budget in (5, 14, 20, 30, 97, 150, 669, 1001):
        for tasks in (1, 3, 4, 11):
            sched = iteration_schedule(budget, num_tasks=tasks, epochs=10)
            assert sched["iterations"] == sched["epochs"] * sched["batches_per_task"] * tasks
            assert 1 <= sched["epochs"] <= 10
            assert abs(sched["iterations"] - budget) <= max(tasks, 0.01 * budget), (budget, tasks, sched)
    assert iteration_schedule(14, num_tasks=1, epochs=10) == {"epochs": 7, "batches_per_task": 2, "iterations": 14}
    assert iteration_schedule(150, num_tasks=11, epochs=10)["iterations"] == 154  # 7 epochs x 2 x 11, not 110
    assert iteration_schedule(97, num_tasks=1, epochs=10)["epochs"] == 8  # 96, not 1 epoch of 97 (no lr decay)
    # a time budget of 669 iterations: the multi-task run and the three single-task thirds get the same total
    assert iteration_schedule(669, 3)["iterations"] == 3 * iteration_schedule(223, 1)["iterations"] == 675
    with pytest.raises(ValueError, match=">= 1"):
        iteration_schedule(0, num_tasks=2)


def test_compare_trains_every_method_for_the_same_budget(compared):
    report = compared["report"]
    assert report["tasks"] == ["brain_mr", "lesion_petct"]  # the 2D task is left out: UniSeg, Hermes are 3D
    runs = report["runs"]
    assert set(runs) == set(METHODS)
    for m in METHODS:
        assert runs[m]["iterations"] == 8, m
        assert runs[m]["train_seconds"] > 0
    singles = [
        json.loads((compared["out"] / "runs" / "single" / t / "training.json").read_text()) for t in report["tasks"]
    ]
    assert [s["iterations"] for s in singles] == [4, 4]  # an equal share per task, same total
    assert len(runs["single"]["checkpoints"]) == 2
    # parameters as the checkpoints hold them; the baseline counts both of its networks
    for m in METHODS:
        nets = [load_checkpoint(c)[0] for c in runs[m]["checkpoints"]]
        assert runs[m]["parameters"] == sum(p.numel() for net in nets for p in net.parameters()), m


def test_an_interrupted_comparison_continues_where_it_stopped(compared):
    out = compared["out"]
    first = [c["out"] for c in compared["first"]]
    assert first == [
        out / "runs" / "uniseg" / "model",
        out / "runs" / "meduniseg" / "model",
        out / "runs" / "hermes" / "model",
    ]
    # the second call trains only what was not finished: Hermes, resumed from its checkpoint, then the baseline
    second = compared["second"]
    assert second[0] == {"out": out / "runs" / "hermes" / "model", "resume": True}
    assert [c["out"] for c in second[1:]] == [
        out / "runs" / "single" / t / "model" for t in ("brain_mr", "lesion_petct")
    ]
    hermes = json.loads((out / "runs" / "hermes" / "training.json").read_text())
    assert hermes["resumed"] and hermes["iterations"] == 8 and hermes["epochs"] == 2
    # a call with other settings is refused instead of mixing two comparisons; the methods' order does not count
    with pytest.raises(ValueError, match="budget_iterations: 8 -> 16"):
        compare(str(compared["demo"]), **{**compared["args"], "budget_iterations": 16})
    with pytest.raises(ValueError, match="config: "):
        compare(str(compared["demo"]), **{**compared["args"], "config": {"augment": True}})
    again = compare(str(compared["demo"]), **{**compared["args"], "methods": ",".join(reversed(METHODS))})
    assert again["runs"]["hermes"]["per_task"] == compared["report"]["runs"]["hermes"]["per_task"]  # nothing redone
    assert again["table"].startswith("| task | class | single-task | Hermes")  # the columns follow --methods
    compare(str(compared["demo"]), **compared["args"])  # the report in the original order again


def test_compare_table_is_what_evaluate_reports(compared):
    report, out = compared["report"], compared["out"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"]["uniseg"]["per_task"] == report["runs"]["uniseg"]["per_task"]
    # the Markdown table, read back: one row per task and class, one column per method
    lines = [line.split("|")[1:-1] for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0]]
    assert header == ["task", "class", "UniSeg", "MedUniSeg", "Hermes", "single-task", "all-background"]
    cells = {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in lines[1:]}
    for i, m in enumerate(METHODS):
        for ckpt in report["runs"][m]["checkpoints"]:
            datalist = Path(ckpt).parents[1] / "datalist.json" if m == "single" else out / "data" / "datalist.json"
            res = workflows.evaluate(ckpt, datalist, mirror=False)  # compare scored without mirroring
            assert res["cases"] == (2 if m != "single" else 1)
            for task, classes in res["per_task"].items():
                for cls, dice in classes.items():
                    assert report["runs"][m]["per_task"][task][cls] == pytest.approx(dice, abs=1e-6), (m, task, cls)
                    assert cells[(task, cls)][i] == f"{dice:.4f}", (m, task, cls)
        assert cells[("**mean over tasks**", "")][i] == f"**{report['runs'][m]['mean']:.4f}**"
        assert cells[("training iterations", "")][i] == "8"
    assert report["baseline_mean"] == pytest.approx(0.0)
    # the chart: one colour per method (matplotlib's first four), each with bars; one quick-look per method and task
    from matplotlib.image import imread

    chart = imread(out / "compare.png")[..., :3]
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"):
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(chart - rgb).max(-1) < 0.02).sum() > 50, colour
    for m in METHODS:
        for task in report["tasks"]:
            png = imread(report["runs"][m]["pictures"][task])
            left, _ = outline_pixels(png, (1.0, 0.0, 0.0))
            assert left > 20, f"{m} {task}: the ground truth's class 1 has no outline"


def test_compare_minutes_budget_is_turned_into_iterations_by_a_probe(demo):
    root, folder = demo
    out = root / "minutes"
    report = compare(
        str(folder),
        out=out,
        budget_minutes=0.05,
        methods="single",
        epochs=2,
        config={"augment": False},
        probe_iterations=4,
    )
    total = 0
    for task in ("brain_mr", "lesion_petct"):  # half of the 3 s each
        budget = json.loads((out / "runs" / "single" / task / "budget.json").read_text())
        assert budget["share"] == 0.5 and budget["seconds_per_iteration"] > 0 and budget["seconds_per_epoch"] >= 0
        # the planned iterations and epochs spend the task's 1.5 s at the probe's rates: the budget is floored to whole
        # iterations (< 1) and the schedule's total may differ from that by up to the task count (1 here)
        spent = budget["iterations"] * budget["seconds_per_iteration"] + budget["epochs"] * budget["seconds_per_epoch"]
        if budget["iterations"] > 1:
            assert abs(spent - 1.5) <= budget["seconds_per_iteration"] * 2.05 + 0.05 * 1.5, budget
        assert not (out / "runs" / "single" / task / "probe").exists()  # the probe's scratch run is removed
        total += budget["iterations"]
    assert report["runs"]["single"]["iterations"] == total


def test_compare_cli_refuses_bad_arguments(demo, tmp_path, capsys):
    from uniseg_components import cli

    _, folder = demo
    cases = [
        ([], "exactly one of --budget_minutes and --budget_iterations"),
        (["--budget_minutes", "1", "--budget_iterations", "5"], "exactly one"),
        (["--budget_iterations", "5", "--methods", "uniseg,nnunet"], "unknown method 'nnunet'"),
        (["--budget_iterations", "5", "--methods", "uniseg,uniseg"], "each method once"),
        (["--budget_iterations", "5.5"], "whole number"),
        (["--budget_iterations", "5", "--val_fraction", "0"], "--val_fraction must be in (0, 1)"),
        (["--budget_iterations", "5", "--config", '{"epochs": 3}'], "may not set ['epochs']"),
        (["--budget_iterations", "5", "--config", "[1, 2]"], "--config must be a JSON object"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["compare", str(folder), "--out", str(tmp_path / "c"), *extra])
        assert exit_.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # fire keeps JSON's literals as strings inside a parsed dict: --config '{"augment": false}' must mean False
    assert cli._config_entries({"augment": "false", "cache_rate": 0.5, "x": "null"}) == {
        "augment": False,
        "cache_rate": 0.5,
        "x": None,
    }
    assert cli._config_entries('{"augment": true}') == {"augment": True} and cli._config_entries(None) == {}


def test_quicklook_outlines_the_structures_of_each_class(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 40, 32, 12)).astype(np.float32)
    label = np.zeros((1, 40, 32, 12), np.int16)
    label[0, 5:15, 4:12, 6:9] = 1
    label[0, 25:35, 20:28, 7] = 2
    assert pick_slice(label[0]) == 7  # the slice with the most foreground
    assert pick_slice(np.zeros((4, 4, 5)), label[0, :4, :4, :5] * 0) == 2  # nothing anywhere: the middle
    pred = np.zeros_like(label)
    pred[0, 6:15, 4:12, 5:9] = 1  # class 2 missed
    cases = [
        QuickLookCase.from_volumes("a.nii.gz", image, label, pred, dice=[0.9, 0.0]),
        QuickLookCase.from_volumes("b.nii.gz", image, np.zeros_like(label), np.zeros_like(label)),
    ]
    assert cases[0].slice_index == 7 and cases[0].image.shape == (32, 40)  # rows = 2nd axis
    info = write_quicklook(cases, tmp_path / "q.png", ["background", "organ", "tumour"], title="t")
    a, b = info["cases"]
    assert a["label_outline"][0] > 0 and a["label_outline"][1] > 0
    assert a["pred_outline"][0] > 0 and a["pred_outline"][1] == 0  # the missed class has no predicted outline
    assert b["label_outline"] == [0, 0] and b["pred_outline"] == [0, 0]
    from matplotlib.image import imread

    png = imread(tmp_path / "q.png")
    top = png[: png.shape[0] // 2]  # the first case's row
    green_left, green_right = outline_pixels(top, (0.0, 1.0, 0.0))
    assert green_left > 10 and green_right == 0  # class 2 (green): ground truth only
    with pytest.raises(ValueError, match="must be the same"):
        QuickLookCase.from_volumes("c", image, label[..., :5], pred)
    with pytest.raises(ValueError, match="no case"):
        write_quicklook([], tmp_path / "none.png", ["bg", "fg"])
    assert not list(tmp_path.glob(".*tmp"))


def test_dice_chart_draws_a_bar_per_method_and_task(tmp_path):
    from matplotlib.image import imread

    path = write_dice_chart({"UniSeg": {"a": 0.5, "b": 0.5}, "single-task": {"a": 0.25}}, tmp_path / "c.png")
    png = imread(path)[..., :3]

    def area(colour):
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(png - rgb).max(-1) < 0.02).sum())

    blue, orange = area("#1f77b4"), area("#ff7f0e")  # matplotlib's first two colours
    assert orange > 100 and blue > 3 * orange  # two bars of 0.5 against one of 0.25 (and the legend patches)
    with pytest.raises(ValueError, match="no method or no task"):
        write_dice_chart({}, tmp_path / "d.png")


def test_foreground_slices_keep_the_frames_around_the_structure():
    label = np.zeros((1, 6, 6, 40), np.float32)
    label[0, 2:4, 2:4, 30:33] = 1  # most foreground: slice 30 (first of the ties)
    image = np.arange(6 * 6 * 40, dtype=np.float32).reshape(1, 6, 6, 40)
    batch = [{"image": torch.as_tensor(image), "label": torch.as_tensor(label)}, {"image": None, "label": None}]
    images, labels = ForegroundSlices(["image", "label"], frames=8)(batch)
    assert len(images) == 1 and images[0].shape == (1, 6, 6, 8)
    np.testing.assert_array_equal(images[0], image[..., 26:34])  # centred on slice 30
    assert labels[0].sum() == label.sum()  # the whole structure is in the frames
    (pred,) = ForegroundSlices(["pred"], frames=8)([{"pred": label[..., ::-1].copy(), "label": label}])
    np.testing.assert_array_equal(pred, label[..., ::-1][..., 26:34])  # the label chooses, not the prediction
    flat = {"image": np.zeros((3, 16, 16)), "label": np.zeros((1, 16, 16))}
    assert ForegroundSlices(["image"])(flat)[0].shape == (3, 16, 16)  # 2D: whole
    with pytest.raises(ValueError, match="frames must be"):
        ForegroundSlices(["image"], frames=0)

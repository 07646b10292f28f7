# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The upstream bundle's training side: train.json, evaluate.json, multi_gpu_train.json, resume, MLflow.

Runs the configs on a tiny demo collection (3 cases per 3D task, 1 batch per task per epoch) on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("nilearn")

from conftest import (  # noqa: E402
    FAST,
    assert_same_training_state,
    batch_recorder_overlay,
    config,
    error_chain,
    evaluate_run,
    interrupted_and_resumed,
    monai_label_training,
    recorded_batches,
    run,
    torchrun_training,
    workflow,
)

from uniseg_components.checkpoints import load_checkpoint  # noqa: E402
from uniseg_components.handlers import epoch_seed, resume_path  # noqa: E402

BUNDLE = "uniseg_universal_segmentation"
TASKS = ["abdomen_ct", "brain_mr", "lesion_petct"]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training run from an absent dataset_dir (the demo is built there) with validation."""
    root = tmp_path_factory.mktemp("upstream")
    wf = workflow(BUNDLE, "train.json", root, demo_cases=3, **FAST)
    assert wf.check_properties() in (None, [])
    run(wf)
    return root


def test_train_builds_demo_and_writes_model_and_tensorboard(trained):
    datalist = json.loads((trained / "demo_data" / "datalist.json").read_text())
    assert {it["task"] for it in datalist["training"]} == {"abdomen_ct", "brain_mr", "lesion_petct"}
    assert len(datalist["validation"]) == 3
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    assert cat.names == ["abdomen_ct", "brain_mr", "lesion_petct"]
    raw = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert set(raw["model"]) == set(net.state_dict())  # exactly network_def's keys (MONAI Label loads these)
    assert not any(k.startswith("module.") for k in raw["model"])
    latest = torch.load(trained / "models" / "checkpoint_latest.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "meta"} <= set(latest)
    assert latest["trainer"]["epoch_length"] == 3 and latest["trainer"]["iteration"] == 3
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    summary = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert set(summary["per_task"]) == {"abdomen_ct", "brain_mr", "lesion_petct"}
    assert 0.0 <= summary["mean"] <= 1.0


def test_train_properties_and_recipe(tmp_path):
    wf = workflow(BUNDLE, "train.json", tmp_path, demo_cases=2)
    assert wf.check_properties() in (None, [])
    p = wf.parser
    assert p["epochs"] == 1000 and p["batches_per_task"] == 50 and p["batch_size"] == 2
    assert p["learning_rate"] == 0.01 and p["momentum"] == 0.99 and p["weight_decay"] == 3e-5
    assert p["max_grad_norm"] == 12.0 and p["optimizer"]["nesterov"] is True
    assert p["lr_scheduler"]["power"] == 0.9
    assert p["training"] == p["run"]


def test_evaluate_prints_and_saves_per_task_dice(trained, capsys):
    out = evaluate_run(BUNDLE, trained, capsys)
    assert "Dice per task and class" in out and "brain_mr" in out


def test_monai_label_overrides_without_task_and_validation(trained, tmp_path):
    """MONAI Label: task-less {image, label} items, an empty validation list, its own max_epochs."""
    model = monai_label_training(BUNDLE, tmp_path, trained / "demo_data", "abdomen_ct", batches_per_task=2)
    net, cat = load_checkpoint(model)
    assert len(cat) == 3


def test_resume_gives_the_same_weights(trained, tmp_path):
    """a 2-epoch run stopped after its first epoch and resumed ends where the uninterrupted run ends (the per-epoch
    reseed makes the augmentation repeatable too)."""
    common = {"dataset_dir": str(trained / "demo_data"), "validate#dataset#data": [], "batches_per_task": 1}
    states = interrupted_and_resumed(BUNDLE, tmp_path, epochs=2, augment=True, **common)
    assert states["interrupted"]["trainer"]["iteration"] == 3
    assert states["full"]["trainer"]["iteration"] == 6 and states["full"]["lr_scheduler"]["last_epoch"] == 2
    assert_same_training_state(states["full"], states["resumed"])


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resume_path(tmp_path, True)
    assert resume_path(tmp_path, False).endswith("checkpoint_latest.pt")
    assert epoch_seed(0, 1) != epoch_seed(0, 2) != epoch_seed(0, 2, rank=1)


def test_bad_catalog_and_unknown_task_fail_clearly(trained, tmp_path):
    wf = workflow(
        BUNDLE, "train.json", tmp_path / "a", dataset_dir=str(trained / "demo_data"), catalog="no_such_catalog"
    )
    with pytest.raises(Exception) as err:
        wf.run()
    assert "no_such_catalog" in error_chain(err.value)

    d = json.loads((trained / "demo_data" / "datalist.json").read_text())
    d["catalog"] = str(trained / "demo_data" / "tasks.json")
    d["training"][0] = dict(d["training"][0], task="liver_mystery")
    bad = tmp_path / "bad_datalist.json"
    bad.write_text(json.dumps(d))
    wf = workflow(BUNDLE, "train.json", tmp_path / "b", datalist=str(bad))
    with pytest.raises(Exception) as err:
        wf.run()
    msg = error_chain(err.value)
    assert "liver_mystery" in msg and "abdomen_ct" in msg


def test_multi_gpu_overlay_two_cpu_processes(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP, rank-sharded sampler, sharded validation, rank 0 saves."""
    args = [
        "--dataset_dir",
        str(trained / "demo_data"),
        "--epochs",
        "1",
        "--batches_per_task",
        "2",
        "--augment",
        "False",
    ]
    torchrun_training(BUNDLE, tmp_path, *args, overlays=[batch_recorder_overlay(tmp_path)])
    seen = {r: [tuple(b["files"]) for b in recorded_batches(tmp_path / "eval", r)] for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 3  # 3 tasks x 2 batches over 2 ranks
    assert seen[0] != seen[1]
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert cat.names == TASKS
    assert (tmp_path / "models" / "checkpoint_latest.pt").is_file()


def test_mlflow_tracking(trained, tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "eval"
    wf = workflow(
        BUNDLE,
        "train.json",
        tmp_path,
        tracking="mlflow",
        dataset_dir=str(trained / "demo_data"),
        output_dir=str(out),
        **FAST,
    )
    run(wf)
    assert (out / "mlruns.db").is_file() or (out / "mlruns").exists()
    assert list(out.glob("config_*.json"))


def test_distributed_helpers_and_data_errors(tmp_path):
    from uniseg_components.bundle import ensure_datalist, find_bundle_root
    from uniseg_components.distributed import distributed_backend, get_rank

    assert distributed_backend("cpu") == "gloo" and distributed_backend("cuda:1") == "nccl"
    assert get_rank() == 0
    with pytest.raises(FileNotFoundError, match="--datalist"):
        ensure_datalist(tmp_path, datalist=tmp_path / "missing.json")
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="neither a datalist.json nor MSD"):
        ensure_datalist(tmp_path)
    assert find_bundle_root("no_such_bundle") == "."


@pytest.mark.parametrize(
    "bundle",
    ["uniseg_universal_segmentation", "meduniseg_universal_segmentation", "hermes_universal_segmentation",
     "uniseg_finetune_segmentation"],
)  # fmt: skip
def test_evaluate_mirrors_only_models_trained_with_mirroring(bundle, tmp_path) -> None:
    """The train configs record their augment in the checkpoint; evaluate.json (and the CLI's evaluate) mirror a
    model trained without flips only when asked: its mirrored predictions are worse (a fine-tune demo model trained
    with --augment False scored 0.59 without and 0.13 with mirroring)."""
    from types import SimpleNamespace

    from monai.bundle import ConfigParser

    from uniseg_components.checkpoints import CheckpointMeta, trained_with_mirroring

    train = ConfigParser.load_config_file(config(bundle, "train.json"))
    assert train["checkpoint_meta"]["mirrored"] == "@augment"
    final = tmp_path / "models" / "model_final.pt"
    final.parent.mkdir()
    for mirrored, axes in ((False, []), (True, [0, 1, 2]), (None, [0, 1, 2])):
        torch.save({"model": {}, "meta": CheckpointMeta(mirrored=mirrored).state_dict()}, final)
        assert trained_with_mirroring(final) is (mirrored is not False)
        parser = ConfigParser()
        parser.read_config([config(bundle, "train.json"), config(bundle, "evaluate.json")])
        parser.update(
            {"bundle_root": str(tmp_path), "network_def": SimpleNamespace(plan=SimpleNamespace(spatial_dims=3))}
        )
        assert parser.get_parsed_content("validate#inferer#mirror_axes") == axes, mirrored
    assert trained_with_mirroring(tmp_path / "absent.pt", default=False) is False


@pytest.mark.parametrize(
    "bundle",
    ["uniseg_universal_segmentation", "meduniseg_universal_segmentation", "hermes_universal_segmentation",
     "uniseg_finetune_segmentation"],
)  # fmt: skip
def test_evaluate_config_defaults_to_the_papers_protocol(bundle, tmp_path) -> None:
    """evaluate.json scores the final weights with a Gaussian window and mirroring on every axis (the papers'
    protocol); --eval_checkpoint best and --eval_mirror False give training's validation setting."""
    from types import SimpleNamespace

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([config(bundle, "train.json"), config(bundle, "evaluate.json")])
    net = SimpleNamespace(plan=SimpleNamespace(spatial_dims=3))  # what the expressions read of network_def
    parser.update({"bundle_root": str(tmp_path), "network_def": net})
    loader = next(h for h in parser.get("validate#handlers") if "CheckpointLoader" in h["_target_"])
    assert loader["load_path"].startswith("@")  # a key of its own, so that the choice below reaches it
    assert parser.get("validate#inferer#mode") == "gaussian"
    assert parser.get_parsed_content(loader["load_path"][1:]) == str(tmp_path / "models" / "model_final.pt")
    assert parser.get_parsed_content("validate#inferer#mirror_axes") == [0, 1, 2]
    parser.update({"eval_checkpoint": "best", "eval_mirror": False})
    parser.parse(reset=True)
    assert parser.get_parsed_content(loader["load_path"][1:]) == str(tmp_path / "models" / "model.pt")
    assert parser.get_parsed_content("validate#inferer#mirror_axes") == []

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The upstream bundle's training side: train.json, evaluate.json, multi_gpu_train.json, resume, MLflow.

Runs the configs on a tiny demo collection (3 cases per 3D task, 1 batch per task per epoch) on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nilearn")

from monai.bundle import ConfigWorkflow  # noqa: E402

from uniseg_components.checkpoints import load_checkpoint  # noqa: E402
from uniseg_components.handlers import epoch_seed, resume_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "uniseg_universal_segmentation"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = str(CONFIGS / "evaluate.json")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.json")
LOGGING = str(CONFIGS / "logging.conf")
FAST = {"epochs": 1, "batches_per_task": 1, "augment": False, "sw_batch_size": 4}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="1073741824")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _workflow(config_file: str | list[str], bundle_root: Path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=config_file, logging_file=LOGGING, workflow_type="train", bundle_root=str(bundle_root), **override
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training run from an absent dataset_dir (the demo is built there) with validation."""
    root = tmp_path_factory.mktemp("upstream")
    wf = _workflow(TRAIN, root, demo_cases=3, **FAST)
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
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
    wf = _workflow(TRAIN, tmp_path, demo_cases=2)
    assert wf.check_properties() in (None, [])
    p = wf.parser
    assert p["epochs"] == 1000 and p["batches_per_task"] == 50 and p["batch_size"] == 2
    assert p["learning_rate"] == 0.01 and p["momentum"] == 0.99 and p["weight_decay"] == 3e-5
    assert p["max_grad_norm"] == 12.0 and p["optimizer"]["nesterov"] is True
    assert p["lr_scheduler"]["power"] == 0.9
    assert p["training"] == p["run"]


def test_evaluate_prints_and_saves_per_task_dice(trained, capsys):
    wf = _workflow([TRAIN, EVALUATE], trained)
    wf.run()
    wf.finalize()
    out = capsys.readouterr().out
    assert "Dice per task and class" in out and "brain_mr" in out and "mean over tasks" in out
    saved = json.loads((trained / "eval" / "dice_per_task.json").read_text())
    val = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert saved["mean"] == pytest.approx(val["mean"], abs=1e-5)  # the loaded best model scores as in training


def test_monai_label_overrides_without_task_and_validation(trained, tmp_path):
    """MONAI Label: task-less {image, label} items, an empty validation list, its own max_epochs."""
    items = json.loads((trained / "demo_data" / "datalist.json").read_text())["training"]
    ct = [{"image": it["image"], "label": it["label"]} for it in items if it["task"] == "abdomen_ct"]
    override = {
        "dataset_dir": str(trained / "demo_data"),
        "task": "abdomen_ct",
        "train#dataset#data": ct,
        "validate#dataset#data": [],
        "train#trainer#max_epochs": 1,
        "batches_per_task": 2,
        "augment": False,
    }
    wf = ConfigWorkflow(config_file=TRAIN, logging_file=LOGGING, run_id="run", bundle_root=str(tmp_path), **override)
    wf.initialize()
    assert wf.parser.get_parsed_content("network") is not None
    wf.run()
    wf.finalize()
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert len(cat) == 3


def test_resume_gives_the_same_weights(trained, tmp_path):
    common = {"dataset_dir": str(trained / "demo_data"), "validate#dataset#data": [], "batches_per_task": 1}
    common["augment"] = True  # the per-epoch reseed makes the augmentation repeatable too
    full, part = tmp_path / "full", tmp_path / "part"
    # the interrupted run: a 2-epoch run stopped after its first epoch (the schedule depends on max_epochs)
    stop = (
        "$@train#trainer.add_event_handler(monai.engines.workflow.Events.EPOCH_COMPLETED(once=1), "
        "lambda e: e.terminate())"
    )
    for root, resume, extra in (
        (full, False, {}),
        (part, False, {"run": [stop, "$@train#trainer.run()"]}),
        (part, True, {}),
    ):
        wf = _workflow(TRAIN, root, epochs=2, resume=resume, **common, **extra)
        wf.run()
        wf.finalize()
        if extra:
            assert torch.load(root / "models" / "checkpoint_latest.pt", weights_only=True)["trainer"]["iteration"] == 3
    a = torch.load(full / "models" / "checkpoint_latest.pt", weights_only=True)
    b = torch.load(part / "models" / "checkpoint_latest.pt", weights_only=True)
    assert b["trainer"]["iteration"] == a["trainer"]["iteration"] == 6
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 2


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resume_path(tmp_path, True)
    assert resume_path(tmp_path, False).endswith("checkpoint_latest.pt")
    assert epoch_seed(0, 1) != epoch_seed(0, 2) != epoch_seed(0, 2, rank=1)


def _error_chain(e: BaseException) -> str:
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def test_bad_catalog_and_unknown_task_fail_clearly(trained, tmp_path):
    wf = _workflow(TRAIN, tmp_path / "a", dataset_dir=str(trained / "demo_data"), catalog="no_such_catalog")
    with pytest.raises(Exception) as err:
        wf.run()
    assert "no_such_catalog" in _error_chain(err.value)

    d = json.loads((trained / "demo_data" / "datalist.json").read_text())
    d["catalog"] = str(trained / "demo_data" / "tasks.json")
    d["training"][0] = dict(d["training"][0], task="liver_mystery")
    bad = tmp_path / "bad_datalist.json"
    bad.write_text(json.dumps(d))
    wf = _workflow(TRAIN, tmp_path / "b", datalist=str(bad))
    with pytest.raises(Exception) as err:
        wf.run()
    msg = _error_chain(err.value)
    assert "liver_mystery" in msg and "abdomen_ct" in msg


def test_multi_gpu_overlay_two_cpu_processes(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP, rank-sharded sampler, sharded validation, rank 0 saves."""
    record = tmp_path / "record.json"
    record.write_text(
        json.dumps(
            {"+train#handlers": [{"_target_": "uniseg_components.handlers.BatchRecorder", "output_dir": "@output_dir"}]}
        )
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", str([TRAIN, MULTI_GPU, str(record)]),
        "--bundle_root", str(tmp_path), "--dataset_dir", str(trained / "demo_data"),
        "--epochs", "1", "--batches_per_task", "2", "--augment", "False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {}
    for r in (0, 1):
        lines = (tmp_path / "eval" / f"batches_rank{r}.jsonl").read_text().splitlines()
        seen[r] = [tuple(json.loads(line)["files"]) for line in lines]
        assert len(seen[r]) == 3  # 3 tasks x 2 batches over 2 ranks
    assert seen[0] != seen[1]
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert cat.names == ["abdomen_ct", "brain_mr", "lesion_petct"]
    assert (tmp_path / "models" / "checkpoint_latest.pt").is_file()


def test_mlflow_tracking(trained, tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "eval"
    wf = ConfigWorkflow(
        config_file=TRAIN,
        logging_file=LOGGING,
        workflow_type="train",
        tracking="mlflow",
        bundle_root=str(tmp_path),
        dataset_dir=str(trained / "demo_data"),
        output_dir=str(out),
        **FAST,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
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

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The MedUniSeg bundle: 2D + 3D training, evaluation, inference (2D, 3D, all tasks), MONAI Label keys, resume,
multi-GPU, MedUniSeg* relearning and the release zip.

Runs the configs on a tiny demo collection (2 cases per task, 1 batch per task per epoch) on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")

from conftest import reference_all_tasks, reference_prediction  # noqa: E402
from monai.bundle import ConfigParser, ConfigWorkflow  # noqa: E402

from uniseg_components.checkpoints import load_checkpoint  # noqa: E402
from uniseg_components.methods.meduniseg import MedUniSeg, MedUniSegStar  # noqa: E402
from uniseg_components.tasks import TaskCatalog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "meduniseg_universal_segmentation"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = str(CONFIGS / "evaluate.json")
INFERENCE = str(CONFIGS / "inference.json")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.json")
RELEARN = str(CONFIGS / "relearn.json")
METADATA = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
FAST = {"epochs": 1, "batches_per_task": 1, "augment": False, "sw_batch_size": 4}
DEMO = TaskCatalog.builtin("demo")
TASKS_2D = [t.name for t in DEMO if t.dims == 2]
TASKS_3D = [t.name for t in DEMO if t.dims == 3]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="1073741824")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(config_file: str | list[str], bundle_root: Path, workflow_type: str = "train", **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=config_file,
        logging_file=LOGGING,
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training run from an absent dataset_dir (every demo task, 2D and 3D, is built there) with validation."""
    root = tmp_path_factory.mktemp("meduniseg")
    _run(TRAIN, root, demo_cases=2, val_fraction=0.5, **FAST)
    return root


def _items(root: Path, section: str, task: str) -> list[dict]:
    return [it for it in json.loads((root / "demo_data" / "datalist.json").read_text())[section] if it["task"] == task]


def test_train_on_2d_and_3d_tasks_writes_model_tensorboard_and_dice(trained):
    datalist = json.loads((trained / "demo_data" / "datalist.json").read_text())
    assert {it["task"] for it in datalist["training"]} == set(DEMO.names)
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    assert isinstance(net, MedUniSeg) and cat.names == DEMO.names
    assert [t.dims for t in cat] == [t.dims for t in DEMO] and set(cat.dims) == {2, 3}
    raw = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert set(raw["model"]) == set(net.state_dict()) and not any(k.startswith("module.") for k in raw["model"])
    latest = torch.load(trained / "models" / "checkpoint_latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == len(DEMO)  # one single-task batch per task, 2D and 3D
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    summary = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert set(summary["per_task"]) == set(DEMO.names)  # the 2D tasks are validated with their own 2D windows
    assert 0.0 <= summary["mean"] <= 1.0


def test_train_properties_and_recipe(trained, tmp_path):
    wf = ConfigWorkflow(
        config_file=TRAIN,
        logging_file=LOGGING,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(trained / "demo_data"),
    )
    wf.initialize()
    assert wf.check_properties() in (None, [])
    p = wf.parser
    assert p["epochs"] == 1000 and p["batches_per_task"] == 50 and p["batch_size"] == 2
    assert p["learning_rate"] == 0.01 and p["momentum"] == 0.99 and p["optimizer"]["nesterov"] is True
    assert p["max_grad_norm"] == 12.0 and p["lr_scheduler"]["power"] == 0.9 and p["weight_decay"] == 3e-5
    assert p["bundle_data"]["dims"] is None and "MedUniSeg.from_catalog" in p["network_def"]
    assert p["validate"]["inferer"]["catalog"] == "@task_catalog"
    assert p["training"] == p["run"]


def test_evaluate_rebuilds_the_network_from_the_checkpoint(trained, capsys):
    _run([TRAIN, EVALUATE], trained)
    out = capsys.readouterr().out
    assert "fetal_us" in out and "abdomen_ct" in out and "mean over tasks" in out
    saved = json.loads((trained / "eval" / "dice_per_task.json").read_text())
    val = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert saved["mean"] == pytest.approx(val["mean"], abs=1e-5)


def _infer(root: Path, out: Path, **override) -> list[Path]:
    _run(INFERENCE, root, workflow_type="infer", meta_file=METADATA, output_dir=str(out), device="cpu", **override)
    return sorted(out.glob("*.nii.gz"))


@pytest.mark.parametrize("task", ["fetal_us", "chest_xr", "abdomen_ct"])
def test_inference_2d_and_3d_on_the_input_grid(trained, tmp_path, task):
    image = _items(trained, "validation", task)[0]["image"]
    written = _infer(trained, tmp_path, datalist=image, task=task)
    assert [p.name for p in written] == [Path(image).name.replace(".nii.gz", f"_{task}.nii.gz")]
    src, lab = nib.load(image), nib.load(str(written[0]))
    # 2D tasks give 2D maps on the grid of the 2D input file
    expected = src.shape[:2] if DEMO[task].dims == 2 else src.shape[:3]
    assert lab.shape == expected
    np.testing.assert_allclose(lab.affine[:2, :2], src.affine[:2, :2], atol=1e-4)
    np.testing.assert_allclose(lab.affine[:2, 3], src.affine[:2, 3], atol=1e-3)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(range(DEMO[task].num_classes))
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    expected_map = reference_prediction(net, cat, image, task)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected_map[0].numpy())


def test_inference_all_tasks_of_a_2d_modality(trained, tmp_path):
    image = _items(trained, "validation", "fetal_us")[0]["image"]
    written = _infer(trained, tmp_path, datalist=image, task="all", modality="US")
    lab = nib.load(str(written[0]))
    assert written[0].name.endswith("_all.nii.gz") and lab.shape == nib.load(image).shape
    offset = DEMO["fetal_us"].label_offset
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, offset + 1}
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    expected, tasks = reference_all_tasks(net, cat, image, ["US"])
    assert [t.name for t in tasks] == ["fetal_us"]
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected[0].numpy())


def test_monai_label_style_inference_and_metadata(trained):
    """inference.json parsed as MONAI Label does: network_def + models/model.pt, preprocessing, inferer, post."""
    from monai.transforms import Compose, SaveImaged

    raw = Path(INFERENCE).read_text()
    assert "_meta_" not in raw
    meta = json.loads(Path(METADATA).read_text())
    assert meta["version"] in meta["changelog"] and meta["eval_metrics"]["val_mean_dice"] > 0
    out = next(iter(meta["network_data_format"]["outputs"].values()))
    default = DEMO[json.loads(raw)["task"]]
    assert out["channel_def"] == {str(i): n for i, n in enumerate(default.labels)}
    if SCHEMA.is_file():
        from monai.bundle import verify_metadata

        verify_metadata(meta_file=METADATA, filepath=str(SCHEMA), create_dir=False)

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.read_meta(METADATA)
    parser.update({"bundle_root": str(trained), "device": "cpu", "task": "chest_xr"})
    network = parser.get_parsed_content("network_def")
    ckpt = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    result = network.load_state_dict(ckpt["model"], strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    network.eval()
    pre = parser.get_parsed_content("preprocessing")
    post = Compose([t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)])
    inferer = parser.get_parsed_content("inferer")
    image = _items(trained, "validation", "chest_xr")[0]["image"]
    data = pre({"image": image})
    assert data["task"] == "chest_xr" and data["image"].ndim == 3
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert data["pred"].shape[0] == 3
    pred = post(data)["pred"]
    assert pred.shape == (1, *nib.load(image).shape)


def test_monai_label_train_overrides_without_task_and_validation(trained, tmp_path):
    items = [{"image": it["image"], "label": it["label"]} for it in _items(trained, "training", "fetal_us")]
    override = {
        "dataset_dir": str(trained / "demo_data"),
        "task": "fetal_us",
        "train#dataset#data": items,
        "validate#dataset#data": [],
        "train#trainer#max_epochs": 1,
        "batches_per_task": 2,
        "augment": False,
    }
    wf = ConfigWorkflow(config_file=TRAIN, logging_file=LOGGING, run_id="run", bundle_root=str(tmp_path), **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert isinstance(net, MedUniSeg) and cat.names == DEMO.names


def test_resume_gives_the_same_weights(trained, tmp_path):
    common = {"dataset_dir": str(trained / "demo_data"), "tasks": "fetal_us,lesion_petct", "batches_per_task": 1}
    common.update({"validate#dataset#data": [], "augment": True})
    full, part = tmp_path / "full", tmp_path / "part"
    stop = (
        "$@train#trainer.add_event_handler(monai.engines.workflow.Events.EPOCH_COMPLETED(once=1), "
        "lambda e: e.terminate())"
    )
    for root, resume, extra in (
        (full, False, {}),
        (part, False, {"run": [stop, "$@train#trainer.run()"]}),
        (part, True, {}),
    ):
        _run(TRAIN, root, epochs=2, resume=resume, **common, **extra)
    a = torch.load(full / "models" / "checkpoint_latest.pt", weights_only=True)
    b = torch.load(part / "models" / "checkpoint_latest.pt", weights_only=True)
    assert b["trainer"]["iteration"] == a["trainer"]["iteration"] == 4  # 2 tasks (one 2D, one 3D) x 2 epochs
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k


def test_multi_gpu_overlay_two_cpu_processes(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP over a 2D and a 3D task, rank-sharded batches, rank 0 saves."""
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
        "--bundle_root", str(tmp_path), "--dataset_dir", str(trained / "demo_data"), "--tasks", "fetal_us,brain_mr",
        "--epochs", "1", "--batches_per_task", "2", "--augment", "False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {}
    for r in (0, 1):
        lines = (tmp_path / "eval" / f"batches_rank{r}.jsonl").read_text().splitlines()
        seen[r] = [tuple(json.loads(line)["files"]) for line in lines]
        assert len(seen[r]) == 2  # 2 tasks x 2 batches over 2 ranks
    assert seen[0] != seen[1]
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert cat.names == ["brain_mr", "fetal_us"]


def test_relearn_trains_only_adapters_and_keeps_other_tasks(trained, tmp_path):
    root = tmp_path / "relearn"
    wf = _run(
        [TRAIN, RELEARN],
        root,
        upstream_ckpt=str(trained / "models" / "model.pt"),
        dataset_dir=str(trained / "demo_data"),
        relearn_tasks="fetal_us",
        epochs=1,
        batches_per_task=3,
        augment=False,
        sw_batch_size=4,
    )
    assert {it["task"] for it in wf.parser.get_parsed_content("train#dataset#data")} == {"fetal_us"}
    assert not (root / "models" / "model.pt").exists()  # never the upstream file
    ckpt = root / "models" / "relearn" / "model.pt"
    assert json.loads((root / "eval" / "relearn" / "val_dice_per_task.json").read_text())["per_task"].keys() == set(
        DEMO.names
    )
    star, cat = load_checkpoint(ckpt)
    base, _ = load_checkpoint(trained / "models" / "model.pt")
    assert isinstance(star, MedUniSegStar) and star.relearn_tasks == [cat["fetal_us"].id]
    assert torch.load(ckpt, weights_only=True)["meta"]["network"]["name"] == "MedUniSegStar"
    for k, v in base.state_dict().items():  # the upstream weights are frozen
        assert torch.equal(star.base.state_dict()[k], v), k
    assert any(bool(p.abs().sum() > 0) for n, p in star.adapters.named_parameters() if ".up." in n)  # trained
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in cat:
            x = torch.rand(1, t.num_channels, *t.patch_size, generator=g)
            same = torch.equal(star(x, t.id), base(x, t.id))
            assert same == (t.name != "fetal_us"), t.name  # other tasks bitwise unchanged, the relearned one moved

    image = _items(trained, "validation", "fetal_us")[0]["image"]
    written = _infer(root, tmp_path / "pred", ckpt_path=str(ckpt), datalist=image, task="fetal_us")
    expected = reference_prediction(star, cat, image, "fetal_us")
    np.testing.assert_array_equal(np.asarray(nib.load(str(written[0])).dataobj), expected[0].numpy())


def test_relearn_needs_a_task_or_a_threshold(trained, tmp_path):
    wf = ConfigWorkflow(
        config_file=[TRAIN, RELEARN],
        logging_file=LOGGING,
        workflow_type="train",
        bundle_root=str(tmp_path),
        upstream_ckpt=str(trained / "models" / "model.pt"),
        dataset_dir=str(trained / "demo_data"),
        relearn_dice=str(trained / "eval" / "val_dice_per_task.json"),
        relearn_threshold=1.01,
    )
    wf.initialize()
    assert wf.parser.get_parsed_content("relearn_task_names") == DEMO.names  # every task is below a Dice of 1.01
    wf.parser.update({"relearn_tasks": "nothing_like_this"})
    with pytest.raises(Exception) as err:
        wf.parser.get_parsed_content("relearn_task_names", lazy=False)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert "nothing_like_this" in "\n".join(chain) and "fetal_us" in "\n".join(chain)


def test_release_zip(trained, tmp_path):
    import shutil

    from uniseg_components.packaging import package

    src = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, src, ignore=shutil.ignore_patterns("eval", "demo_data", "models", "__pycache__"))
    (src / "models").mkdir()
    shutil.copy(trained / "models" / "model.pt", src / "models" / "model.pt")
    zip_path = package(src, out=tmp_path / "dist")
    version = json.loads(Path(METADATA).read_text())["version"]
    assert zip_path.name == f"{BUNDLE.name}_v{version}.zip"
    names = set(zipfile.ZipFile(zip_path).namelist())
    for required in (
        "LICENSE",
        "docs/README.md",
        "models/model.pt",
        "uniseg_components/methods/meduniseg/network.py",
    ) + tuple(
        f"configs/{c}" for c in ("metadata.json", "train.json", "evaluate.json", "inference.json", "relearn.json")
    ):
        assert f"{BUNDLE.name}/{required}" in names, required

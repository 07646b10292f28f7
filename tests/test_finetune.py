# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Downstream fine-tuning: UniSegDownstream, load_upstream_weights and the uniseg_finetune_segmentation bundle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import STOP_AFTER_FIRST_EPOCH, error_chain

from uniseg_components.checkpoints import build_network, load_checkpoint, with_checksum
from uniseg_components.data import prepare
from uniseg_components.demo import write_demo_collection
from uniseg_components.methods.uniseg import UniSegDownstream
from uniseg_components.methods.uniseg.finetune import load_upstream_weights, task_catalog
from uniseg_components.tasks import TaskCatalog
from uniseg_components.workflows import train

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "uniseg_finetune_segmentation"
CPU_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1073741824", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A UniSeg upstream checkpoint from a very short joint training on brain_mr + lesion_petct, and demo data of
    the downstream task abdomen_ct."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    up_demo = write_demo_collection(root / "up_demo", tasks=["brain_mr", "lesion_petct"], num_cases=2)
    dl = prepare([up_demo / "Demo02_BrainMR", up_demo / "Demo03_LesionPETCT"], "demo", root / "up_prepared")
    # val_interval > epochs: no validation, the final checkpoint is the upstream model
    train(dl, output_dir=root / "up_model", epochs=1, batches_per_task=2, val_interval=2, augment=False, seed=0)
    ft_demo = write_demo_collection(root / "ft_demo", tasks=["abdomen_ct"], num_cases=3)
    return {"root": root, "ckpt": root / "up_model" / "model_final.pt", "ft_demo": ft_demo}


def _downstream(**overrides) -> UniSegDownstream:
    torch.manual_seed(1)
    return UniSegDownstream.from_catalog(task_catalog("demo", "abdomen_ct"), **overrides)


def test_downstream_network_shapes_and_config():
    net = _downstream().eval()
    assert net.backbone.upsamples[0].weight.shape[0] == net.plan.features[-1]  # no prompt channel
    assert not any(k.startswith(("prompt", "fuse")) for k in net.state_dict())
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (1, 3, 48, 48, 48)
        assert torch.equal(net(x, task_id=0), out)  # the shared engines pass task_id=0
        rebuilt = build_network(net.config)
        rebuilt.load_state_dict(net.state_dict())
        assert torch.equal(rebuilt.eval()(x), out)
    with pytest.raises(ValueError, match="out of range"):
        net(x, task_id=1)
    net.train()
    assert isinstance(net(x), list)  # deep supervision
    with pytest.raises(ValueError, match="one task"):
        UniSegDownstream.from_catalog(TaskCatalog.builtin("demo").select(dims=3))


def test_load_upstream_weights_loads_adapts_and_reinitialises(upstream):
    up_net, _ = load_checkpoint(upstream["ckpt"])
    up = up_net.state_dict()
    net = _downstream()
    heads_before = {k: v.clone() for k, v in net.state_dict().items() if ".heads." in k}
    report = load_upstream_weights(net, upstream["ckpt"])
    state = net.state_dict()
    f = net.plan.features[-1]
    # the transposed conv keeps the upstream weights of the feature channels, without the prompt's channel
    assert report["adapted"] == ["backbone.upsamples.0.weight"]
    assert up["backbone.upsamples.0.weight"].shape[0] == f + 1
    assert state["backbone.upsamples.0.weight"].shape[0] == f
    assert torch.equal(state["backbone.upsamples.0.weight"], up["backbone.upsamples.0.weight"][:f])
    # every other backbone weight (except heads and the PET/CT stem, which abdomen CT does not use) is loaded
    expected = {
        k for k in state if k.startswith("backbone.") and ".heads." not in k and k != "backbone.upsamples.0.weight"
    }
    assert set(report["loaded"]) == expected
    for k in expected:
        assert torch.equal(state[k], up[k]), k
    # heads keep their fresh initialisation for the new class count
    assert sorted(report["reinitialised"]) == sorted(heads_before)
    for k, v in heads_before.items():
        assert torch.equal(state[k], v)
    assert report["missing"] == []
    skipped = set(report["skipped"])
    assert "prompt" in skipped and any(k.startswith("fuse.") for k in skipped)
    assert "backbone.stems.2.weight" in skipped and any(".heads." in k for k in skipped)
    # nothing is frozen
    assert all(p.requires_grad for p in net.parameters())


def test_mismatched_plan_raises(upstream):
    net = _downstream(features=[8, 16, 32, 48])
    with pytest.raises(ValueError, match=r"upstream .*\[8, 16, 32, 64\] vs downstream \[8, 16, 32, 48\]"):
        load_upstream_weights(net, upstream["ckpt"])
    with pytest.raises(FileNotFoundError):
        load_upstream_weights(_downstream(), upstream["root"] / "missing.pt")


def _overrides(upstream, name: str) -> dict[str, object]:
    out = upstream["root"] / name
    return {
        "bundle_root": str(BUNDLE),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "dataset_dir": str(upstream["ft_demo"]),
        "epochs": 1,
        "num_iterations": 2,
        "augment": False,
    }


def test_bundle_finetunes_from_upstream_checkpoint(upstream):
    ov = _overrides(upstream, "ft_pretrained")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
    cmd += ["--config_file", str(BUNDLE / "configs" / "train.json"), "--pretrained", str(upstream["ckpt"])]
    for k, v in ov.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=upstream["root"], env={**os.environ, **CPU_ENV}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 adapted" in proc.stdout + proc.stderr  # the load report
    model = Path(ov["ckpt_dir"]) / "model.pt"
    net, cat = load_checkpoint(model)
    assert isinstance(net, UniSegDownstream) and cat.names == ["abdomen_ct"]
    obj = torch.load(model, weights_only=True)
    assert set(obj) == {"model", "meta", "checksum"}  # the saver adds the checksum it verifies on load
    assert obj["model"]["backbone.upsamples.0.weight"].shape[0] == net.plan.features[-1]


def _train_workflow(overrides: dict[str, object]):
    """The fine-tune bundle's train.json as a ``ConfigWorkflow`` with overrides, initialised."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "train.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="train",
        run_id="training",
        **overrides,
    )
    wf.initialize()
    return wf


def test_bundle_trains_from_scratch_and_evaluates(upstream):
    from monai.bundle import ConfigWorkflow

    ov = _overrides(upstream, "ft_scratch")
    torch.set_num_threads(1)
    wf = _train_workflow(ov)
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
    model = Path(ov["ckpt_dir"]) / "model.pt"
    net, cat = load_checkpoint(model)
    assert isinstance(net, UniSegDownstream) and cat.names == ["abdomen_ct"]

    # evaluate.json on top of train.json reloads models/model.pt and reports the Dice
    ev = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="eval",
        **ov,
    )
    ev.initialize()
    ev.run()
    ev.finalize()
    assert (Path(ov["output_dir"]) / "val_mean_dice_raw.csv").is_file() or (
        Path(ov["output_dir"]) / "metrics.csv"
    ).is_file()


def test_inference_config_the_way_monai_label_reads_it(upstream, tmp_path):
    """Parse inference.json like MONAI Label: network_def + models/model.pt (state dict under "model"),
    preprocessing, inferer, postprocessing without SaveImaged; device given as a string."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert "@_meta_" not in (BUNDLE / "configs" / "inference.json").read_text()
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    cat = task_catalog("demo", "abdomen_ct")
    assert [channel_def[str(i)] for i in range(len(channel_def))] == list(cat[0].labels)

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(tmp_path), "device": "cpu"})
    net = parser.get_parsed_content("network_def")
    # models/model.pt in the layout training writes ({"model": state_dict, "meta": ...}); MONAI Label takes "model"
    trained = UniSegDownstream.from_catalog(cat)
    (tmp_path / "models").mkdir()
    torch.save({"model": trained.state_dict(), "meta": {}}, tmp_path / "models" / "model.pt")
    obj = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    net.load_state_dict(obj.get("model", obj))
    net.eval()
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])

    img_path = sorted((upstream["ft_demo"] / "Demo01_AbdomenCT" / "imagesTr").glob("*.nii.gz"))[0]
    original = nib.load(str(img_path))
    data = pre({"image": str(img_path)})  # MONAI Label items carry no task: the bundle's task is the default
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], net)[0]  # MONAI Label calls inferer(x, network)
    out = post(data)
    pred = out["pred"]
    assert pred.shape[0] == 1 and tuple(pred.shape[1:]) == original.shape[:3]  # back on the original grid
    values = set(np.unique(pred.numpy()).tolist())
    assert values <= {0.0, 1.0, 2.0}


def test_bundle_checks_and_exports(tmp_path):
    """verify_metadata (local schema), verify_net_in_out, ckpt_export (scripted and traced) and onnx_export."""
    from monai.bundle import ckpt_export, onnx_export, verify_metadata, verify_net_in_out

    torch.set_num_threads(1)
    configs = BUNDLE / "configs"
    common = {"meta_file": str(configs / "metadata.json"), "config_file": str(configs / "inference.json")}
    schema = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
    if schema.is_file():
        verify_metadata(meta_file=common["meta_file"], filepath=str(schema))
    verify_net_in_out(net_id="network_def", **common)
    cat = task_catalog("demo", "abdomen_ct")
    torch.manual_seed(0)
    net = UniSegDownstream.from_catalog(cat).eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, ckpt)
    x = torch.randn(1, 1, 64, 48, 96)  # another size than the patch: the export is fully convolutional
    with torch.no_grad():
        expected = net(x)
    for name, extra in (("scripted", {}), ("traced", {"use_trace": True, "input_shape": [1, 1, 48, 48, 48]})):
        ts_path = tmp_path / f"model_{name}.ts"
        ckpt_export(
            net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt), key_in_ckpt="model", **common, **extra
        )
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(str(ts_path))(x), expected, rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnx_path = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def",
        filepath=str(onnx_path),
        ckpt_file=str(ckpt),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=[1, 1, 48, 48, 48],
        **common,
    )
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_path)))


def test_task_data_from_datalist_and_dataset_dir(upstream, tmp_path):
    from uniseg_components.methods.uniseg.finetune import inference_items, prepare_task_data

    cat = task_catalog("demo", "abdomen_ct")
    from_dir = prepare_task_data(cat, dataset_dir=upstream["ft_demo"], output_dir=tmp_path / "a")
    assert len(from_dir["training"]) == 2 and len(from_dir["validation"]) == 1
    # a datalist with another task's item and an item without task: only this task's items are kept
    dl = {
        "training": from_dir["training"] + [{"image": "x.nii.gz", "label": "y.nii.gz", "task": "brain_mr"}],
        "validation": [{k: v for k, v in it.items() if k != "task"} for it in from_dir["validation"]],
    }
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    from_list = prepare_task_data(cat, datalist=tmp_path / "dl.json")
    assert from_list["training"] == from_dir["training"]
    assert [it["task"] for it in from_list["validation"]] == ["abdomen_ct"]
    with pytest.raises(ValueError, match="dataset_dir"):
        prepare_task_data(cat)
    with pytest.raises(ValueError, match="2D"):
        task_catalog("demo", "fetal_us")
    items = inference_items(str(upstream["ft_demo"] / "Demo01_AbdomenCT" / "imagesTr"), cat)
    assert len(items) == 3 and all(it["task"] == "abdomen_ct" for it in items)
    with pytest.raises(FileNotFoundError):
        inference_items(str(tmp_path / "nothing.nii.gz"), cat)


def test_bundle_resumes_from_the_latest_full_state(upstream):
    """Every epoch writes models/checkpoint_latest.pt (weights, optimiser, scheduler, trainer); --resume continues an
    interrupted run; extending a finished run past its learning-rate schedule is refused with a clear error."""
    torch.set_num_threads(1)
    ov = _overrides(upstream, "ft_resume")

    def run(epochs: int, resume: bool, **extra):
        wf = _train_workflow({**ov, "epochs": epochs, "resume": resume, **extra})
        wf.run()
        wf.finalize()
        return wf

    run(2, False, run=STOP_AFTER_FIRST_EPOCH)  # a 2-epoch run interrupted after its first epoch
    latest = Path(ov["ckpt_dir"]) / "checkpoint_latest.pt"
    state = torch.load(latest, weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "meta"} <= set(state)
    assert state["trainer"]["iteration"] == 2  # 1 epoch x 2 iterations
    # mark the saved weights: a resumed run that has nothing left to do must come back with exactly them
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key] = torch.full_like(state["model"][key], 0.123)
    torch.save(with_checksum(state), latest)  # an edited checkpoint needs a new checksum: the reader refuses others
    wf = run(1, True)
    net = wf.parser.get_parsed_content("network")
    assert torch.all(net.state_dict()[key] == 0.123)
    wf = run(2, True)  # the second epoch on top of the saved state
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 4
    with pytest.raises(Exception) as err:  # its poly decay reached 0 at epoch 2
        run(3, True)
    assert re.search(r"schedule .* ends at epoch 2.*--epochs 2", error_chain(err.value))

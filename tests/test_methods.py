# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The method protocol and registry: every registered method keeps its promises, and a fourth method, defined here and
registered at run time, trains, evaluates, infers, exports and benchmarks through the generic code paths (CLI,
bundle configs, checkpoints, export) without any edit outside this file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_PLAN
from monai.bundle import ConfigParser
from torch import nn

from uniseg_components import cli
from uniseg_components.bundle import bundle_dir
from uniseg_components.checkpoints import build_network, load_checkpoint
from uniseg_components.export import TaskInputs, class_mask, mask_classes, task_tensor, trace
from uniseg_components.losses import TaskDiceCELoss
from uniseg_components.methods import METHODS, Method, get_method, method_of, register_method, unregister_method
from uniseg_components.networks import UNetBackbone, UNetPlan, plan_from_catalog, task_index
from uniseg_components.tasks import TaskCatalog

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- a fourth method
class DummyNet(nn.Module):
    """The plain backbone with one shared head sliced per task: no prompt at all (the single-task baseline's network
    made task-aware only by its output slice)."""

    def __init__(self, plan: UNetPlan, num_classes: Sequence[int], in_channels: Sequence[int] = (1,)) -> None:
        super().__init__()
        self.plan, self.num_classes, self.num_tasks = plan, [int(k) for k in num_classes], len(num_classes)
        self.backbone = UNetBackbone(plan, in_channels, max(self.num_classes))

    @classmethod
    def from_catalog(cls, catalog: TaskCatalog, **kwargs: Any) -> DummyNet:
        return cls(plan_from_catalog(catalog), catalog.num_classes, catalog.channel_counts)

    @property
    def config(self) -> dict[str, Any]:
        return {"name": "DummyNet", "plan": self.plan.to_dict(), "num_classes": self.num_classes,
                "in_channels": list(self.backbone.in_channels)}  # fmt: skip

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DummyNet:
        return cls(UNetPlan.from_dict(config["plan"]), config["num_classes"], config["in_channels"])

    def forward(self, x: torch.Tensor, task_id: Any) -> Any:
        k = self.num_classes[task_index(task_id, self.num_tasks, x.shape[0])]
        out = self.backbone(x)
        return [o[:, :k] for o in out] if isinstance(out, list) else out[:, :k]

    def forward_all_tasks(self, x: torch.Tensor, task_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
        return [self(x, t) for t in (range(self.num_tasks) if task_ids is None else task_ids)]


class _Exportable(nn.Module):
    """``(x, task_id)`` -> logits padded to the widest task, traceable (the task is a tensor)."""

    def __init__(self, net: DummyNet) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mask", class_mask(net.num_classes), persistent=False)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        return mask_classes(self.net.backbone(x), self.mask, task_tensor(task_id, 0, x.device))


class DummyMethod(Method):
    """Trains and serves through the UniSeg bundle's configs, replacing only the network definition."""

    name = "dummy"
    title = "Dummy"
    networks = (DummyNet,)
    bundles = {"DummyNet": "uniseg_universal_segmentation"}
    output = "softmax"
    dims = (3,)
    loss_class = TaskDiceCELoss

    def bundle_overrides(self, job: str) -> dict[str, Any]:
        if job != "train":
            return {}  # inference gets the checkpoint's own network from the CLI
        return {"dummy_method": self, "network_def": "$@dummy_method.build(@task_catalog)"}

    def torchscript(self, network: nn.Module, catalog: Any = None, default_task: int | None = None) -> Any:
        exp = _Exportable(network.eval())
        return trace(TaskInputs(exp), (torch.rand(1, 1, *network.plan.patch_size), torch.tensor([0])))

    def onnx_example(self, network, catalog, channels, default_task) -> tuple:
        inputs = (torch.rand(1, channels or 1, *network.plan.patch_size), torch.tensor([default_task or 0]))
        return TaskInputs(_Exportable(network)), inputs, ["image", "task_id"], {"image": {0: "batch"}}

    def run_benchmark(self, catalog=None, patch_size=None, repeats=3, device=None) -> dict[str, Any]:
        cat = TaskCatalog.resolve(catalog or "demo").select(dims=3)
        return {"params": sum(p.numel() for p in self.build(cat).parameters())}

    def format_benchmark(self, result: Mapping[str, Any]) -> str:
        return f"| measure | value |\n|---|---|\n| parameters | {result['params']:,} |"


@pytest.fixture(scope="module")
def dummy():
    method = register_method(DummyMethod())
    yield method
    unregister_method(method.name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from uniseg_components.demo import write_demo_collection

    root = tmp_path_factory.mktemp("dummy")
    data = write_demo_collection(root / "demo", tasks=["abdomen_ct", "brain_mr"], num_cases=4)
    datalist = cli.prepare(str(data), out=str(root / "prepared"), val_fraction=0.25)
    return {"root": root, "datalist": Path(datalist)}


def test_a_new_method_trains_evaluates_infers_exports_and_benchmarks_through_the_generic_paths(dummy, demo, tmp_path):
    out = demo["root"] / "run"
    recipe = {"epochs": 4, "batches_per_task": 10, "val_interval": 4, "learning_rate": 0.03, "augment": False}
    ckpt = cli.train(str(demo["datalist"]), method="dummy", output_dir=str(out), device="cpu", **recipe)
    assert Path(ckpt) == out / "model.pt"
    assert (out / "model_final.pt").is_file() and (out / "checkpoint_latest.pt").is_file()
    raw = torch.load(ckpt, weights_only=True)
    assert raw["meta"]["network"]["name"] == "DummyNet" and "checksum" in raw
    net, cat = load_checkpoint(ckpt)
    assert isinstance(net, DummyNet) and method_of(net) is dummy and cat.names == ["abdomen_ct", "brain_mr"]
    assert isinstance(build_network(raw["meta"]["network"]), DummyNet)

    # evaluation with the bundle's inference on held-out cases: better than an all-background prediction
    report = tmp_path / "eval.json"
    mean = cli.evaluate(ckpt, str(demo["datalist"]), output=str(report))
    res = json.loads(report.read_text())
    assert res["cases"] == 2 and set(res["per_task"]) == {"abdomen_ct", "brain_mr"}
    assert mean == pytest.approx(res["mean"]) and mean > res["baseline_mean"] + 0.1

    # inference of one task and of all tasks of a modality, on the input's grid
    val = json.loads(demo["datalist"].read_text())["validation"]
    brain = next(it["image"] for it in val if it["task"] == "brain_mr")
    (seg,) = cli.infer(ckpt, brain, task="brain_mr", out=str(tmp_path / "pred"))
    src, lab = nib.load(brain), nib.load(seg)
    assert lab.shape == src.shape and np.allclose(lab.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}
    ct = next(it["image"] for it in val if it["task"] == "abdomen_ct")
    (merged,) = cli.infer(ckpt, ct, task="all", modality="CT", out=str(tmp_path / "pred"))
    assert Path(merged).name.endswith("_all.nii.gz")
    assert set(np.unique(np.asarray(nib.load(merged).dataobj)).tolist()) <= {0, 1, 2}

    # export: TorchScript and ONNX take the task as an input and equal the eager network
    written = cli.export(ckpt, out=str(tmp_path / "export"))
    ts = torch.jit.load([p for p in written if p.endswith(".ts")][0])
    assert any(p.endswith("model_c1.onnx") for p in written)
    x = torch.rand(1, 1, *net.plan.patch_size)
    with torch.no_grad():
        k = cat["brain_mr"].num_classes
        torch.testing.assert_close(ts(x, torch.tensor([1]))[:, :k], net(x, 1))

    # benchmark: the CLI reaches the method's own report
    assert "### dummy" in cli.benchmark(model="dummy") and "parameters" in cli.benchmark(model="dummy")


# ---------------------------------------------------------------------------------------------- the registry
def test_registry_finds_methods_by_name_network_and_config(dummy):
    assert [m for m in METHODS] == ["uniseg", "meduniseg", "hermes", "dummy"]
    assert get_method("UniSeg") is METHODS["uniseg"]
    with pytest.raises(ValueError, match="unknown method 'nnunet'; registered methods: uniseg, meduniseg, hermes"):
        get_method("nnunet")
    with pytest.raises(ValueError, match="already registered"):
        register_method(DummyMethod())
    with pytest.raises(ValueError, match=r"unknown network 'Conv3d'.*UniSeg \(uniseg\).*Hermes \(hermes\)"):
        method_of(nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="unknown network 'Nope'"):
        build_network({"name": "Nope"})
    wrapped = nn.parallel.DataParallel(DummyNet(UNetPlan.from_dict(TINY_PLAN), [2, 3]))
    assert method_of(wrapped) is dummy and method_of({"name": "DummyNet"}) is dummy


@pytest.mark.parametrize("name", ["uniseg", "meduniseg", "hermes"])
def test_every_method_keeps_the_protocol(name):
    """build from a catalog, config round trip, forward for a task, probabilities -> label map, loss on the training
    output, its bundle folder, and ownership of its networks."""
    method = get_method(name)
    catalog = method.select_catalog(TaskCatalog.builtin("demo"))
    assert all(t.dims in method.dims for t in catalog)
    torch.manual_seed(0)
    net = method.build(catalog, patch_size=(16, 16, 16), features=[4, 8, 16, 16])
    assert method.owns(net) and method.owns(net.config) and method_of(net) is method
    again = method.from_config(net.config)
    again.load_state_dict(net.state_dict())
    task = next(t for t in catalog if t.dims == 3 and t.num_channels == 1)
    x = torch.rand(2, 1, 16, 16, 16)
    net.eval(), again.eval()
    with torch.no_grad():
        logits = net(x, task_id=task.id)
        assert torch.equal(logits, again(x, task_id=task.id))
    k = task.num_classes if method.output == "softmax" else task.num_classes - 1
    assert logits.shape == (2, k, 16, 16, 16)
    probs = method.probabilities(logits)
    labels = method.label_map(probs)
    assert labels.shape == (2, 1, 16, 16, 16) and int(labels.min()) >= 0 and int(labels.max()) <= task.num_classes - 1
    if method.output == "softmax":
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16, 16))
    # the bundle's validation post-processing turns logits into the same label map
    parser = ConfigParser()
    parser.read_config(str(bundle_dir(method.bundle_for(net)) / "configs" / "train.json"))
    post = parser.get_parsed_content("validate#postprocessing")
    assert torch.equal(torch.as_tensor(post({"pred": logits[0]})["pred"]).long(), labels[0].long())
    net.train()
    y = torch.randint(0, task.num_classes, (2, 1, 16, 16, 16)).float()
    loss = method.loss()(net(x, task_id=task.id), y)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for bundle in set(method.bundles.values()):
        assert (bundle_dir(bundle) / "configs" / "train.json").is_file()
    assert method.bundle_for(net) in method.bundles.values()

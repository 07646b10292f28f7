# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""GPU-speed switches of the configs and the CLI (compile, AMP dtype, cuDNN autotuning) and the benchmark's FLOP
figures, checked on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLES, config
from monai.bundle import ConfigParser

from uniseg_components.benchmark import (
    efficiency_rows,
    matmul_peak_flops,
    step_efficiency,
    step_flops,
    step_op_counts,
)
from uniseg_components.bundle import amp_kwargs, set_cudnn_benchmark
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.tasks import TaskCatalog

BUNDLE_NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file())


def test_amp_kwargs_and_cudnn_switch():
    assert amp_kwargs() == {"dtype": torch.float16} and amp_kwargs("bfloat16") == {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        amp_kwargs("float32")
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.deterministic = True  # what MONAI's set_determinism leaves
        assert set_cudnn_benchmark(True) is True and torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.deterministic is False  # autotuning over all algorithms, as nnU-Net
        torch.backends.cudnn.deterministic = True
        assert set_cudnn_benchmark(False) is False and torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.deterministic is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_every_train_and_inference_config_has_the_switches(bundle):
    """compile (default off), amp_dtype (float16) reach the engines of train.json (trainer and evaluator) and of
    inference.json; cudnn_benchmark is set after MONAI's set_determinism (which turns it off)."""
    for name, engines in (("train.json", ["train#trainer", "validate#evaluator"]), ("inference.json", ["evaluator"])):
        parser = ConfigParser()
        parser.read_config(config(bundle, name))
        assert parser["compile"] is False and parser["amp_dtype"] == "float16" and parser["cudnn_benchmark"] is True
        for engine in engines:
            assert parser[f"{engine}#compile"] == "@compile", (name, engine)
            parser["amp_dtype"] = "bfloat16"
            assert parser.get_parsed_content(f"{engine}#amp_kwargs", lazy=False) == {"dtype": torch.bfloat16}
            parser["amp_dtype"] = "float16"
        init = parser["initialize"]
        i = next(i for i, x in enumerate(init) if "set_determinism" in x)
        assert "set_cudnn_benchmark(@cudnn_benchmark)" in init[i + 1], (name, init)
    for overlay in ("multi_gpu_train.json", "multi_gpu_inference.json", "add_tasks.json", "relearn.json"):
        if (BUNDLES / bundle / "configs" / overlay).is_file():
            init = ConfigParser.load_config_file(config(bundle, overlay)).get("initialize")
            assert init is None or any("set_cudnn_benchmark" in x for x in init), overlay  # replaced lists keep it
    inference_imports = ConfigParser.load_config_file(config(bundle, "inference.json"))["imports"]
    assert "$import uniseg_components.bundle" in inference_imports  # a release runs it without the package loaded


def test_step_flops_counts_a_matmul_step_exactly():
    """forward x @ W^T (2 B I O) and the weight gradient (2 B I O): the counter gives exactly 4 B I O."""
    net = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)

    def step() -> None:
        net.zero_grad()
        net(x).square().sum().backward()

    assert step_flops(step) == 4 * 3 * 8 * 4
    eff = step_efficiency({"linear": step}, {"linear": 0.5}, torch.device("cpu"), peak_flops=1e3)
    e = eff["linear"]
    assert e["tflop"] == pytest.approx(384e-12) and e["tflop_s"] == pytest.approx(768e-12)
    assert e["peak_share"] == pytest.approx(768 / 1e3) and e["peak_gib"] is None and e["compiled_s"] is None
    assert e["ops"] > 0 and e["full_res_ops"] == 0  # no patch given: operations only
    rows = dict(efficiency_rows(eff, 1e3))
    assert "(e) linear" in rows and "% of peak" in rows["(e) linear"] and "ops/step" in rows["(e) linear"]
    assert matmul_peak_flops(torch.device("cpu"), size=64, repeats=1) > 0


def test_step_op_counts_counts_kernels_and_full_resolution_bytes():
    """Views cost nothing; an elementwise product of a full-resolution tensor is one operation reading 128 and
    writing 128 bytes; a reduction to a scalar reads the full-resolution tensor only."""
    x = torch.randn(1, 2, 4, 4)
    assert step_op_counts(lambda: x.transpose(2, 3).unsqueeze(0)[..., :2], (4, 4))["ops"] == 0
    assert step_op_counts(lambda: torch.mul(x, 2.0), (4, 4)) == {
        "ops": 1.0,
        "full_res_ops": 1.0,
        "full_res_gb": pytest.approx(256e-9),
    }
    counts = step_op_counts(lambda: torch.mul(x, 2.0).sum(), (4, 4))
    assert counts["ops"] == 2 and counts["full_res_gb"] == pytest.approx(384e-9)
    assert step_op_counts(lambda: torch.mul(x, 2.0).sum(), (8, 8))["full_res_ops"] == 0  # another patch


def test_compiled_network_gives_the_eager_output():
    """torch.compile (inductor, the default backend) of UniSeg: the same logits as eager for each task, and the
    compiled network shares the eager one's parameters (checkpoints hold the plain module's keys)."""
    torch.manual_seed(0)
    net = UniSeg.from_catalog(TaskCatalog.builtin("demo").select(dims=3), patch_size=(16, 16, 16)).eval()
    compiled = torch.compile(net)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for task in (0, 1):
            torch.testing.assert_close(compiled(x, task_id=task), net(x, task_id=task), rtol=1e-4, atol=1e-4)
    assert set(dict(net.named_parameters())) == {k.removeprefix("_orig_mod.") for k, _ in compiled.named_parameters()}


def test_compiled_trainer_steps_on_a_collated_batch():
    """MONAI's SupervisedTrainer with compile=True and the trainers' PrepareTaskBatch(plain_tensors=True): a batch of
    MetaTensors with collated metadata trains (MONAI's compiled path fails re-wrapping such metadata when it is handed
    MetaTensors), the loss is finite and the weights move."""
    from conftest import TINY_PLAN, task_dict
    from monai.data import MetaTensor, list_data_collate
    from monai.engines import SupervisedTrainer

    from uniseg_components.engines import PrepareTaskBatch
    from uniseg_components.losses import TaskDiceCELoss

    torch.manual_seed(0)
    cat = TaskCatalog([task_dict("a", 0, ["background", "x", "y"]), task_dict("b", 1)], plan=TINY_PLAN)
    net = UniSeg.from_catalog(cat)
    items = [
        {
            "image": MetaTensor(torch.randn(1, 16, 16, 16), affine=torch.eye(4)),
            "label": MetaTensor(torch.randint(0, 3, (1, 16, 16, 16)).float(), affine=torch.eye(4)),
            "task_id": 0,
        }
        for _ in range(2)
    ]
    batch = list_data_collate(items)
    prepare = PrepareTaskBatch(plain_tensors=True)
    image, label, _, kwargs = prepare(batch)
    assert type(image) is torch.Tensor and type(label) is torch.Tensor and kwargs == {"task_id": 0}
    assert isinstance(PrepareTaskBatch()(batch)[0], MetaTensor)  # evaluators keep the metadata
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch, batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=TaskDiceCELoss(),
        prepare_batch=prepare,
        compile=True,
        decollate=False,
    )
    trainer.run()
    assert torch.isfinite(torch.as_tensor(trainer.state.output["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())

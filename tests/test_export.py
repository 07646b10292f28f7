# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Bundle checks and exports: verify_metadata, verify_net_in_out, ckpt_export (TorchScript), onnx_export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from uniseg_components.checkpoints import save_checkpoint
from uniseg_components.export import export_onnx, export_torchscript
from uniseg_components.methods.uniseg import UniSeg, UniSegExportable
from uniseg_components.tasks import TaskCatalog

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "uniseg_universal_segmentation"
INFERENCE = BUNDLE / "configs" / "inference.json"
METADATA = BUNDLE / "configs" / "metadata.json"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog.builtin("demo").select(dims=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, catalog: TaskCatalog) -> dict:
    """A bundle root with ``models/model.pt`` (``{"model", "meta"}``) of a seeded, untrained demo UniSeg."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = UniSeg.from_catalog(catalog).eval()
    root = tmp_path_factory.mktemp("export_bundle")
    path = save_checkpoint(root / "models" / "model.pt", net, catalog)
    return {"root": root, "path": path, "net": net}


def _inputs(task) -> torch.Tensor:
    g = torch.Generator().manual_seed(task.id)
    return torch.rand(1, task.num_channels, 48, 48, 48, generator=g)


def test_verify_metadata() -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"the local schema copy {SCHEMA} is absent (verify_metadata would download it)")
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=str(METADATA), filepath=str(SCHEMA), hash_val=SCHEMA_MD5, hash_type="md5", create_dir=False
    )
    meta = json.loads(METADATA.read_text())
    import monai
    import numpy

    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    # the zoo installs exactly this numpy: 2.2.6 is the newest with wheels for Python 3.10 to 3.12 (scripts/check_zoo.sh
    # runs the bundle with it); the tests run with the project's own numpy of the same major version
    assert meta["numpy_version"].split(".")[0] == numpy.__version__.split(".")[0]
    assert "uniseg-components" in meta["required_packages_version"]
    assert any("UniSeg" in r for r in meta["references"]) and any("nnU-Net" in r for r in meta["references"])


def test_verify_net_in_out() -> None:
    """As the model zoo calls it (the image alone: the config's task), and with an explicit task id."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(METADATA), config_file=str(INFERENCE), device="cpu")
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(METADATA),
        config_file=str(INFERENCE),
        device="cpu",
        extra_forward_args={"task_id": 0},
    )


def test_exportable_keeps_uniseg_state_dict(catalog: TaskCatalog, checkpoint: dict) -> None:
    exp = UniSegExportable.from_catalog(catalog, default_task="brain_mr")
    assert list(exp.state_dict()) == list(checkpoint["net"].state_dict())
    assert exp.default_task == catalog["brain_mr"].id
    with pytest.raises(ValueError, match="default_task"):
        UniSegExportable(exp.plan, exp.num_classes, exp.backbone.in_channels, default_task=7)


def test_ckpt_export_torchscript_reproduces_every_task(catalog: TaskCatalog, checkpoint: dict) -> None:
    """monai.bundle ckpt_export of network_def (scripted as UniSegExportable: per-stem traces), task by task."""
    from monai.bundle import ckpt_export

    ts_path = checkpoint["root"] / "models" / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(checkpoint["path"]),
        meta_file=str(METADATA),
        config_file=str(INFERENCE),
        key_in_ckpt="model",
    )
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(METADATA.read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    net = checkpoint["net"]
    with torch.no_grad():
        for task in catalog:
            x = _inputs(task)
            eager = net(x, task.id)
            out = ts(x, torch.tensor([task.id]))
            assert out.shape == (1, max(catalog.num_classes), 48, 48, 48)
            torch.testing.assert_close(out[:, : task.num_classes], eager, rtol=1e-4, atol=1e-5)
            assert torch.equal(out.argmax(1), eager.argmax(1))
        default = ts(torch.rand(1, 1, 48, 48, 48))  # no task id: the config's task (abdomen_ct)
        assert default.shape[1] == max(catalog.num_classes)


def test_onnx_export_cli_and_task_input(catalog: TaskCatalog, checkpoint: dict, tmp_path: Path) -> None:
    """monai.bundle onnx_export (one input: the config's task is baked in) and export_onnx (task id as an input)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from monai.bundle import onnx_export

    net = checkpoint["net"]
    path = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def",
        filepath=str(path),
        ckpt_file=str(checkpoint["path"]),
        meta_file=str(METADATA),
        config_file=str(INFERENCE),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=[1, 1, 48, 48, 48],
        converter_kwargs={"dynamo": False},
        task="brain_mr",
    )
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    brain = catalog["brain_mr"]
    x = _inputs(brain)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), net(x, brain.id), rtol=1e-3, atol=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = {c: export_onnx(net, tmp_path / f"model_c{c}.onnx", channels=c) for c in (1, 2)}
    for c, p in paths.items():
        onnx.checker.check_model(onnx.load(str(p)))
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for task in [t for t in catalog if t.num_channels == c]:
            x = _inputs(task)
            (got,) = sess.run(None, {"image": x.numpy(), "task_id": torch.tensor([task.id]).numpy()})
            with torch.no_grad():
                eager = net(x, task.id)
            torch.testing.assert_close(torch.from_numpy(got[:, : task.num_classes]), eager, rtol=1e-3, atol=1e-4)


def test_export_cli_verb(checkpoint: dict, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "uniseg_components", "export", str(checkpoint["path"]), "--out", str(out),
           "--formats", "torchscript"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = {"catalog.json": ""}
    ts = torch.jit.load(str(out / "model.ts"), _extra_files=extra)
    assert json.loads(extra["catalog.json"])["tasks"][0]["name"] == "abdomen_ct"
    x = torch.rand(1, 2, 48, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ts(x, torch.tensor([2]))[:, :2], checkpoint["net"](x, 2), rtol=1e-4, atol=1e-5)


def test_export_torchscript_rejects_other_networks() -> None:
    with pytest.raises(ValueError, match="UniSeg"):
        export_torchscript(torch.nn.Conv3d(1, 1, 1))

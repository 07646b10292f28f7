# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Publishable bundles: what the model zoo's ``ci/verify_bundle.py`` and MONAI Label need from each release zip.

The real checks (the zoo's own script, a real MONAI Label server) are ``scripts/check_zoo.sh`` and
``scripts/check_monailabel.sh``; these tests run the same MONAI calls (``verify_metadata``, ``verify_net_in_out``
with the image alone, ``ckpt_export network_def``) on the four bundles' release zips, with the vendored code only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, REPO, SCHEMA, subprocess_env
from monai.bundle import ConfigParser

from uniseg_components.bundle import BundleData
from uniseg_components.checkpoints import described_network, save_checkpoint
from uniseg_components.methods.hermes import Hermes
from uniseg_components.methods.meduniseg import MedUniSeg
from uniseg_components.methods.uniseg import UniSeg, UniSegDownstream
from uniseg_components.methods.uniseg.finetune import task_catalog
from uniseg_components.packaging import package, verify_release
from uniseg_components.tasks import TaskCatalog

DEMO = TaskCatalog.resolve("demo")
UPSTREAM = {
    "uniseg_universal_segmentation": UniSeg,
    "meduniseg_universal_segmentation": MedUniSeg,
    "hermes_universal_segmentation": Hermes,
}


def _network(bundle: str, catalog: TaskCatalog | None = None) -> tuple[torch.nn.Module, TaskCatalog]:
    """A fresh network of ``bundle``'s method for ``catalog`` (default: the demo tasks the bundle trains on)."""
    torch.manual_seed(0)
    if bundle == "uniseg_finetune_segmentation":
        cat = catalog or task_catalog("demo", "abdomen_ct")
        return UniSegDownstream.from_catalog(cat), cat
    cls = UPSTREAM[bundle]
    cat = catalog or (DEMO if cls is MedUniSeg else DEMO.select(dims=3))
    return cls.from_catalog(cat), cat


def _schema() -> Path | None:
    return SCHEMA if SCHEMA.is_file() else None


# ---------------------------------------------------------------------------------------------- network_def
@pytest.mark.parametrize("bundle", sorted(UPSTREAM))
def test_network_def_takes_the_image_alone_with_the_trained_keys(bundle, tmp_path):
    """What ``verify_net_in_out``, ``ckpt_export`` and MONAI Label's SimpleInferer call: ``network_def(x)`` runs the
    real network on the config's task; its state dict keys are those of the trained network (train.json), and the
    config parses without any data or weights in the bundle folder."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.read_meta(str(BUNDLES / bundle / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(tmp_path), "task": "brain_mr"})
    net = parser.get_parsed_content("network_def").eval()
    fmt = parser.get_parsed_content("_meta_#network_data_format")
    x = torch.rand(1, fmt["inputs"]["image"]["num_channels"], *fmt["inputs"]["image"]["spatial_shape"])
    task_id = (DEMO if bundle.startswith("med") else DEMO.select(dims=3))["brain_mr"].id
    with torch.no_grad():
        out = net(x)
        explicit = net(x, task_id=task_id)
    assert torch.equal(out, explicit)
    assert out.shape[1] == (3 if bundle.startswith("hermes") else 4)  # brain_mr: CSF, GM, WM (+ background)
    scripted = torch.jit.script(net)  # ckpt_export's path, through the network's __prepare_scriptable__
    with torch.no_grad():
        assert torch.allclose(scripted(x), out, atol=1e-5)  # the image alone: the same task, the same channels
    torch.jit.script(net.train())  # scripting traces in eval mode and gives the network its mode back
    assert all(m.training for m in net.modules())
    assert not any(p.name == "demo_data" for p in tmp_path.iterdir())

    train = ConfigParser()
    train.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    train.update({"bundle_root": str(tmp_path), "catalog": "demo", "dataset_dir": str(tmp_path / "nothing")})
    assert sorted(train.get_parsed_content("network_def").state_dict()) == sorted(net.state_dict())
    assert not (tmp_path / "nothing").exists()  # an explicit catalog needs no data


def test_bundle_data_reads_no_data_until_items_are_needed(tmp_path):
    """MONAI Label brings its own items: with a catalog given, the catalog and task need no dataset folder."""
    data = BundleData(tmp_path / "missing", catalog="demo", task="abdomen_ct", demo_dir=tmp_path / "demo")
    assert data.catalog.names == ["abdomen_ct", "brain_mr", "lesion_petct"] and data.task == "abdomen_ct"
    assert not (tmp_path / "missing").exists() and not (tmp_path / "demo").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        data.train


def test_described_network_reads_our_checkpoints_and_leaves_plain_weights_to_the_config(tmp_path):
    net, cat = _network("meduniseg_universal_segmentation")
    assert described_network(tmp_path / "none.pt") is None
    torch.save(net.state_dict(), tmp_path / "plain.pt")  # the zoo's and MONAI Label's format
    assert described_network(tmp_path / "plain.pt") is None
    save_checkpoint(tmp_path / "ours.pt", net, cat)
    loaded, loaded_cat = described_network(tmp_path / "ours.pt")
    assert loaded_cat.names == cat.names and torch.equal(loaded.prompt, net.prompt)


# ---------------------------------------------------------------------------------------------- release zips
@pytest.mark.parametrize("bundle", sorted([*UPSTREAM, "uniseg_finetune_segmentation"]))
def test_release_zip_with_weights_passes_the_zoo_checks(bundle, tmp_path):
    """``package --weights``: plain state dict, the catalog beside it, code in ``scripts/``, installable pins; the
    staged release passed verify_release (files, version, metadata, weights fit network_def, image-only shape check,
    TorchScript) in a fresh interpreter before the zip was written; here it is checked again, unzipped."""
    net, cat = _network(bundle)
    save_checkpoint(tmp_path / "trained.pt", net, cat)
    zip_path = package(BUNDLES / bundle, out=tmp_path / "dist", weights=tmp_path / "trained.pt", schema=_schema())
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / bundle
    assert {
        f"{bundle}/{f}" for f in ("LICENSE", "models/model.pt", "configs/tasks.json", "scripts/__init__.py")
    } <= set(names)
    assert not any("/eval/" in n or "__pycache__" in n or "verify_model" in n for n in names)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert sorted(state) == sorted(net.state_dict())  # a plain state dict, the trained keys
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert TaskCatalog.resolve(root / "configs" / "tasks.json").to_dict() == cat.to_dict()
    inference = json.loads((root / "configs" / "inference.json").read_text())
    assert inference["catalog"] == "$@bundle_root + '/configs/tasks.json'" and inference["task"] == "abdomen_ct"
    assert json.loads((root / "configs" / "train.json").read_text())["task"] == "abdomen_ct"  # MONAI Label's items
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert "uniseg-components" not in meta["required_packages_version"]
    assert meta["numpy_version"] == "2.2.6"  # the newest numpy with wheels for Python 3.10 to 3.12
    pred = meta["network_data_format"]["outputs"]["pred"]
    if bundle.startswith("hermes"):  # one sigmoid channel per target; channel_def: the saved label map's values
        assert pred["num_channels"] == 2 and pred["channel_def"] == {"1": "organ", "2": "tumour"}
    else:
        assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "organ", "2": "tumour"}

    code = (
        "import sys, json; sys.path.insert(0, '.'); from scripts.packaging import verify_release; "
        f"print(json.dumps(verify_release('.', schema={None if _schema() is None else str(_schema())!r}))); "
        "assert not any(m.startswith('uniseg_components') for m in sys.modules)"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = ["files", "version"] + (["metadata"] if _schema() else []) + ["weights", "net_in_out", "torchscript"]
    assert done == expected


@pytest.mark.parametrize("bundle", sorted(UPSTREAM))
def test_release_zip_serves_another_task_of_another_catalog(bundle, tmp_path):
    """Weights trained on the user's catalog: the release ships that catalog, serves the chosen task, and its
    metadata describes that task (two input channels, lesion), which the shape check then verifies."""
    cat = DEMO.select(names=["brain_mr", "lesion_petct"])
    net, _ = _network(bundle, cat)
    save_checkpoint(tmp_path / "trained.pt", net, cat)
    with pytest.raises(ValueError, match=r"no task 'abdomen_ct'.*\['brain_mr', 'lesion_petct'\]"):
        package(BUNDLES / bundle, out=tmp_path / "dist", weights=tmp_path / "trained.pt")
    assert not (tmp_path / "dist").exists()
    zip_path = package(
        BUNDLES / bundle,
        out=tmp_path / "dist",
        weights=tmp_path / "trained.pt",
        task="lesion_petct",
    )
    with zipfile.ZipFile(zip_path) as zf:
        meta = json.loads(zf.read(f"{bundle}/configs/metadata.json"))
        inference = json.loads(zf.read(f"{bundle}/configs/inference.json"))
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 2 and image["channel_def"] == {"0": "CT", "1": "PET"}
    if bundle.startswith("hermes"):  # one sigmoid channel per target, channel_def by label-map value
        assert pred["num_channels"] == 1 and pred["channel_def"] == {"1": "lesion"}
    else:
        assert pred["num_channels"] == 2 and pred["channel_def"] == {"0": "background", "1": "lesion"}
    assert inference["task"] == "lesion_petct"


def test_weights_that_do_not_fit_the_bundle_are_refused(tmp_path):
    """MONAI Label loads weights with strict=False: a mismatch must stop the release, not ship random weights."""
    net, cat = _network("uniseg_universal_segmentation")
    save_checkpoint(tmp_path / "uniseg.pt", net, cat)
    with pytest.raises(ValueError, match="do not fit network_def"):
        package(BUNDLES / "hermes_universal_segmentation", out=tmp_path / "dist", weights=tmp_path / "uniseg.pt")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_verify_release_names_what_is_missing(tmp_path):
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.2.0", "changelog": {"0.1.0": "x"}}))
    (bundle / "LICENSE").write_text("Apache")
    with pytest.raises(ValueError, match="models/model.pt is missing"):
        verify_release(bundle, mode="min")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"")
    (bundle / "configs" / "inference.json").write_text("{}")
    with pytest.raises(ValueError, match="version '0.2.0' is not listed in 'changelog'"):
        verify_release(bundle, mode="min")


def test_vendored_code_passes_the_model_zoos_lint_settings():
    """The zoo lints a bundle's ``scripts/`` with flake8 (its plugins and select/ignore lists), black and isort, at
    line length 120 (its setup.cfg and pyproject.toml); the vendored files are this package's source."""
    src = REPO / "uniseg_components"
    select = "B,C,E,F,N,P,T4,W,B9"
    ignore = "E203,E501,E741,W503,W504,C408,N812,B023,B905,B028,B907,C419"
    checks = [
        ["flake8", "--max-line-length", "120", "--select", select, "--ignore", ignore,
         "--per-file-ignores", "__init__.py:F401 __main__.py:F401", str(src)],
        ["black", "--check", "-q", "-l", "120", str(src)],
        ["isort", "--check-only", "-q", "--profile", "black", "-l", "120", str(src)],
    ]  # fmt: skip
    for cmd in checks:
        proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd[0]}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


#: third-party packages a single vendored module imports inside a function, which only the bundles whose configs name
#: that module need: package -> (module, why)
ONLY_WHERE_NAMED = {"pytorch-optimizer": ("uniseg_components.optimizers", "LAMB, built by optimizers.lamb")}


def test_every_bundle_requires_what_the_vendored_code_imports():
    """A release vendors the whole package, so each bundle's ``required_packages_version`` (with MONAI, torch and
    numpy, pinned on their own) must name every third-party module the package imports; the zoo installs only these.
    The exceptions (``ONLY_WHERE_NAMED``) are imported only inside functions of one module, and are required by every
    bundle whose configs name that module."""
    import ast

    dist = {"ignite": "pytorch-ignite", "pytorch_optimizer": "pytorch-optimizer"}
    imported, where = set(), {}
    for f in (REPO / "uniseg_components").rglob("*.py"):
        tree = ast.parse(f.read_text())
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                imported.add(name)
                module = ".".join(f.relative_to(REPO).with_suffix("").parts)
                where.setdefault(dist.get(name, name), set()).add((module, id(node) in module_level))
    third_party = {dist.get(m, m) for m in imported - set(sys.stdlib_module_names) - {"uniseg_components"}}
    assert {"fire", "nibabel", "pytorch-ignite", "pytorch-optimizer"} <= third_party  # the scan sees the imports
    for package_name, (module, _) in ONLY_WHERE_NAMED.items():
        assert where[package_name] == {(module, False)}, f"{package_name} is imported elsewhere: {where[package_name]}"
    for bundle in sorted(BUNDLES.glob("*/configs/metadata.json")):
        meta = json.loads(bundle.read_text())
        pinned = set(meta["required_packages_version"]) | {"monai", "torch", "numpy"}
        configs = " ".join(f.read_text() for f in bundle.parent.glob("*.json"))
        needed = {p for p in third_party if p not in ONLY_WHERE_NAMED or ONLY_WHERE_NAMED[p][0] in configs}
        assert needed <= pinned, f"{bundle}: {sorted(needed - pinned)} imported but not required"
    hermes = json.loads((BUNDLES / "hermes_universal_segmentation" / "configs" / "metadata.json").read_text())
    assert "pytorch-optimizer" in hermes["required_packages_version"]  # its train.json builds LAMB


def test_cli_package_with_weights_url_writes_large_files_yml(tmp_path, capsys):
    """``uniseg package --weights W --weights_url URL``: the zoo's large_files.yml names models/model.pt, the URL
    and the md5 of the shipped weights; a URL without weights is refused before anything is written."""
    import hashlib

    from uniseg_components.cli import main

    net, cat = _network("uniseg_finetune_segmentation")
    save_checkpoint(tmp_path / "trained.pt", net, cat)
    bundle, url = str(BUNDLES / "uniseg_finetune_segmentation"), "https://example.org/releases/model.pt"
    main(["package", bundle, "--out", str(tmp_path / "dist"), "--weights", str(tmp_path / "trained.pt"),
          "--weights_url", url, "--check", "False"])  # fmt: skip
    zip_path = Path(capsys.readouterr().out.split()[0])
    with zipfile.ZipFile(zip_path) as zf:
        weights = zf.read("uniseg_finetune_segmentation/models/model.pt")
        entry = zf.read("uniseg_finetune_segmentation/large_files.yml").decode()
    assert 'path: "models/model.pt"' in entry and f'url: "{url}"' in entry
    assert f'hash_val: "{hashlib.md5(weights).hexdigest()}"' in entry and 'hash_type: "md5"' in entry

    with pytest.raises(ValueError, match="weights_url describes the shipped weights"):
        package(BUNDLES / "uniseg_finetune_segmentation", out=tmp_path / "none", weights_url=url)
    assert not (tmp_path / "none").exists()

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Release zips of the bundles, in the form the MONAI model zoo and MONAI Label take them.

``package("bundles/uniseg_universal_segmentation", out="dist", weights="runs/uniseg/model.pt")`` writes
``dist/uniseg_universal_segmentation_v<version>.zip`` (version from ``configs/metadata.json``) holding::

    uniseg_universal_segmentation/
        LICENSE
        configs/     every config, with the package's imports renamed to ``scripts``; ``train.json`` and
                     ``inference.json`` with ``task`` set to the served task (for training, the task of items
                     without one, as MONAI Label sends them); ``metadata.json`` without ``uniseg-components`` in
                     ``required_packages_version``. With weights: ``tasks.json``, the catalog they were trained on
                     (the two configs' ``catalog`` then names it), and ``metadata.json``'s ``network_data_format``
                     describing the served task (channels, patch, ``channel_def`` as MONAI Label reads it)
        docs/        README.md ...
        models/      model.pt: the given weights (default the bundle folder's models/model.pt) as a plain state dict,
                     the zoo's and MONAI Label's format; model.ts / model.onnx / model_trt.ts of the folder
        scripts/     this package's source: a bundle's own code goes in ``scripts/`` (the zoo's convention, and the
                     one module MONAI Label reloads per bundle, so several of our bundles can be served together)
        large_files.yml   with ``weights_url``: where the zoo downloads ``models/model.pt`` from, with its md5

The configs import ``scripts``, which resolves to the bundle's copy whenever the bundle folder is on ``sys.path``:
under MONAI Label and the zoo's CI (both put it there), with ``PYTHONPATH=<bundle>``, or when the command runs from
the bundle folder. A machine with MONAI and its dependencies therefore runs the bundle without this package.

Before the zip is written, :func:`verify_release` runs on the staged folder in a fresh interpreter that can only
import the vendored copy: the weights must load into the configs' ``network_def`` with every key matching (MONAI
Label loads them with ``strict=False`` and would otherwise serve partly random weights), and the zoo's shape and
TorchScript checks must pass. The zip is written to a temporary file and renamed into place, with sorted entries
and fixed timestamps, so the same inputs give the same bytes (and the same sha1 for the zoo's ``model_info.json``).

Left out: ``eval/``, ``demo_data*/``, ``runs/``, ``mlruns/``, caches, temporary files, training-only checkpoints
in ``models/`` (only ``model.pt``, ``model.ts``, ``model.onnx`` and ``model_trt.ts`` ship), and a ``scripts/`` or
``uniseg_components/`` folder from an earlier release (replaced by the current package).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_path, read_json, save_torch

if TYPE_CHECKING:  # torch is imported where weights are handled: listing and zipping files need none
    import torch

__all__ = [
    "PACKAGE_NAME",
    "VENDORED_NAME",
    "MODEL_FILES",
    "bundle_files",
    "package",
    "release_weights",
    "served_task",
    "describe_outputs",
    "verify_release",
    "sha1sum",
]

logger = logging.getLogger("uniseg_components.packaging")

#: this package's import name, and the name its vendored copy takes inside a release
PACKAGE_NAME = "uniseg_components"
VENDORED_NAME = "scripts"
#: files of ``models/`` that go into a release
MODEL_FILES = ("model.pt", "model.ts", "model.onnx", "model_trt.ts")
#: the catalog of the shipped weights, inside a release
CATALOG_FILE = "configs/tasks.json"
_EXCLUDED_DIRS = {
    "eval",
    "demo_data",
    "demo_data_new",
    "runs",
    "mlruns",
    "__pycache__",
    ".pytest_cache",
    ".ipynb_checkpoints",
}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_IMPORT_NAME = re.compile(rf"\b{PACKAGE_NAME}\b")


def _keep(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.startswith((".", "demo_data")) for part in rel.parts):
        return False
    if rel.name.endswith(_EXCLUDED_SUFFIXES) or ".tmp" in rel.name:
        return False
    if rel.parts[0] == "models":
        return len(rel.parts) == 2 and rel.name in MODEL_FILES
    return rel.parts[0] not in (PACKAGE_NAME, VENDORED_NAME)  # an earlier release's copy: replaced


def bundle_files(bundle_dir: str | os.PathLike) -> list[Path]:
    """The bundle's own files that go into a release, relative to ``bundle_dir``, sorted."""
    root = Path(bundle_dir)
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and _keep(p.relative_to(root)))


def _package_files() -> list[tuple[Path, Path]]:
    """``(source file, path inside the release)`` of this package's source, under ``scripts/``."""
    src = Path(__file__).resolve().parent
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if p.suffix in (".py", ".json", ".typed"):
            out.append((p, Path(VENDORED_NAME) / rel))
    return out


def sha1sum(path: str | os.PathLike) -> str:
    """sha1 hex digest of a file (the hash the model zoo records in ``model_info.json``)."""
    return _digest(path, hashlib.sha1())


def _digest(path: str | os.PathLike, h: Any) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_metadata(bundle_dir: Path) -> dict[str, Any]:
    meta_path = bundle_dir / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(bundle_dir)!r} is not a bundle: {str(meta_path)!r} does not exist.")
    meta = read_json(meta_path, "bundle metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), str) or not meta["version"]:
        raise ValueError(f"{str(meta_path)!r} needs a 'version' string.")
    return meta


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode()


def release_weights(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any] | None]:
    """The weights of a checkpoint as a plain state dict, the task catalog it was trained on and its network config.

    Args:
        checkpoint: a checkpoint written by this package's training (checksum verified), or a plain state dict.

    Returns:
        ``(state_dict, catalog, network_config)``; the last two are ``None`` for a plain state dict.

    Raises:
        FileNotFoundError, ValueError: the file is missing, unreadable or damaged, or holds no tensors.
    """
    import torch

    from .checkpoints import CheckpointMeta, read_checkpoint

    obj = read_checkpoint(checkpoint, what="weights")
    state, catalog, config = (obj["model"], None, None) if "model" in obj else (obj, None, None)
    if "meta" in obj:
        meta = CheckpointMeta()
        meta.load_state_dict(obj["meta"])
        catalog, config = meta.catalog, meta.network_config
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {str(checkpoint)!r} hold no state dict of tensors (keys: {sorted(obj)[:8]}).")
    return dict(state), catalog, config


def served_task(inference: Mapping[str, Any], catalog: Any, task: str | None = None) -> str:
    """The task a release serves by default (its configs' ``task``): ``task`` when given, else the inference
    config's ``task`` when the shipped catalog has it.

    Raises:
        ValueError: the task is not in the catalog (the message lists the catalog's tasks).
    """
    name = task or inference.get("task")
    if catalog is not None and (not isinstance(name, str) or name not in catalog.names):
        raise ValueError(
            f"the weights' catalog {catalog.name!r} has no task {name!r} to serve by default; choose one of "
            f"{catalog.names} (package --task NAME)."
        )
    return str(name)


def describe_outputs(meta: Mapping[str, Any], network_config: Mapping[str, Any], catalog: Any, task: str) -> dict:
    """``meta`` with its ``network_data_format`` describing the served ``task`` of ``catalog``: input channels,
    modality and patch; output channels (the task's classes for softmax methods, its targets for sigmoid ones) and
    ``channel_def`` as MONAI Label reads it (each class's value in the saved label map)."""
    from .methods import method_of

    spec = catalog[task]
    sigmoid = method_of(network_config).output == "sigmoid"
    out = json.loads(json.dumps(meta))
    fmt = out.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    image.update(
        num_channels=spec.num_channels,
        modality=spec.modalities[0] if spec.num_channels == 1 else "/".join(spec.modalities),
        spatial_shape=list(spec.patch_size),
        channel_def={str(i): m for i, m in enumerate(spec.modalities)},
    )
    pred = fmt.setdefault("outputs", {}).setdefault("pred", {})
    pred.update(
        num_channels=spec.num_classes - 1 if sigmoid else spec.num_classes,
        spatial_shape=list(spec.patch_size),
        channel_def={str(i): name for i, name in enumerate(spec.labels) if i or not sigmoid},
    )
    post = fmt.get("post_processed_outputs", {}).get("pred")
    if isinstance(post, dict):
        post.update(value_range=[0, spec.num_classes - 1], channel_def={str(i): n for i, n in enumerate(spec.labels)})
    return out


def _vendored_config(text: str) -> str:
    """A config's text with the package's imports and targets renamed to the vendored ``scripts``."""
    return _IMPORT_NAME.sub(VENDORED_NAME, text)


def _stage(
    root: Path,
    stage: Path,
    vendor: bool,
    weights: str | os.PathLike | None,
    url: str | None,
    task: str | None,
) -> None:
    """Write the release's files into ``stage`` (the bundle folder inside the zip)."""
    if weights is None and (root / "models" / "model.pt").is_file():
        weights = root / "models" / "model.pt"  # the folder's own weights, shipped the same way
    state, catalog, network_config = release_weights(weights) if weights is not None else (None, None, None)
    inference = read_json(root / "configs" / "inference.json", "inference config")
    serve = served_task(inference, catalog, task)
    for rel in bundle_files(root):
        if state is not None and rel.as_posix() == "models/model.pt":
            continue  # written below, as a plain state dict
        data = (root / rel).read_bytes()
        if rel.parts[0] == "configs" and rel.suffix == ".json":
            config = json.loads(data)
            if rel.name == "metadata.json":
                if vendor:
                    req = dict(config.get("required_packages_version", {}))
                    for name in (PACKAGE_NAME, PACKAGE_NAME.replace("_", "-")):
                        req.pop(name, None)
                    config["required_packages_version"] = req
                if catalog is not None and network_config is not None:
                    config = describe_outputs(config, network_config, catalog, serve)
            elif rel.name in ("train.json", "inference.json") and isinstance(config, dict):
                # the served task; in train.json also the task of items without one (MONAI Label's)
                config["task"] = serve
                if catalog is not None and "catalog" in config:
                    config["catalog"] = f"$@bundle_root + '/{CATALOG_FILE}'"
            text = _dump_json(config).decode()
            data = (_vendored_config(text) if vendor else text).encode()
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    if vendor:
        for src, rel in _package_files():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(src.read_bytes())
    if state is not None:
        save_torch(state, stage / "models" / "model.pt")
        if catalog is not None:
            (stage / CATALOG_FILE).write_bytes(_dump_json(catalog.to_dict()))
        if url:
            md5 = _digest(stage / "models" / "model.pt", hashlib.md5())
            entry = f'  - path: "models/model.pt"\n    url: "{url}"\n    hash_val: "{md5}"\n    hash_type: "md5"\n'
            (stage / "large_files.yml").write_text("large_files:\n" + entry)


def _check_in_fresh_interpreter(stage: Path, schema: str | os.PathLike | None) -> None:
    """Run :func:`verify_release` on ``stage`` with only its vendored copy importable (what MONAI Label and the
    zoo's CI see); raise ``ValueError`` with its report when a check fails."""
    code = (
        "import sys; sys.path.insert(0, '.'); "
        f"from {VENDORED_NAME}.packaging import verify_release; "
        f"verify_release('.', schema={None if schema is None else str(Path(schema).resolve())!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=stage, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "no output")
        raise ValueError(f"the release of {stage.name!r} fails its checks: {reason}\n" + "\n".join(lines[-15:]))


def package(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike = "dist",
    weights: str | os.PathLike | None = None,
    weights_url: str | None = None,
    vendor: bool = True,
    check: bool = True,
    schema: str | os.PathLike | None = None,
    task: str | None = None,
) -> Path:
    """Write ``<out>/<name>_v<version>.zip`` for the bundle folder ``bundle_dir`` (``<name>`` is its folder name).

    Args:
        bundle_dir: the bundle folder (with ``configs/metadata.json`` and ``LICENSE``).
        out: output folder, created when missing; default ``"dist"``.
        weights: a checkpoint to ship as ``models/model.pt`` (a training checkpoint of this package, whose catalog
            is shipped with it, or a plain state dict), default ``None``: the bundle folder's ``models/model.pt``
            when there is one.
        weights_url: where the weights will be downloadable from; writes ``large_files.yml`` (path, url, md5) for
            the model zoo, whose files may not exceed 25 MB. Default ``None``.
        vendor: copy this package into the release as ``scripts/``, default ``True``.
        check: run :func:`verify_release` on the staged release first (needs ``vendor``), default ``True``.
        schema: a local copy of the metadata schema for that check's ``verify_metadata``, default ``None`` (skipped).
        task: the task the release serves by default (its configs' ``task``, and what ``metadata.json``'s
            ``network_data_format`` then describes), default ``None``: the inference config's.

    Returns:
        the path of the zip.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``configs/metadata.json`` or no ``LICENSE``; ``weights`` missing.
        ValueError: the metadata is not valid JSON or has no version; the weights are damaged or do not fit the
            bundle's ``network_def``; another check of :func:`verify_release` fails. Nothing is written then.
    """
    root = Path(bundle_dir).resolve()
    meta = _read_metadata(root)
    if not (root / "LICENSE").is_file():
        raise FileNotFoundError(f"bundle {str(root)!r} has no LICENSE (required by the bundle specification).")
    if weights_url and weights is None and not (root / "models" / "model.pt").is_file():
        raise ValueError(
            "weights_url describes the shipped weights: give weights (or put models/model.pt in the bundle)."
        )
    name = root.name
    out_dir = Path(out)
    target = out_dir / f"{name}_v{meta['version']}.zip"
    with tempfile.TemporaryDirectory(prefix=f".{name}-release-") as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        _stage(root, stage, vendor, weights, weights_url, task)
        if check and vendor:
            _check_in_fresh_interpreter(stage, schema)
            shutil.rmtree(stage / "eval", ignore_errors=True)  # what the checks wrote
            for p in (stage / "models").glob("verify_*"):
                p.unlink()
            for p in list(stage.rglob("__pycache__")):
                shutil.rmtree(p, ignore_errors=True)
        files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp_zip, zipfile.ZipFile(tmp_zip, "w") as zf:
            for rel in files:
                info = zipfile.ZipInfo(f"{name}/{rel.as_posix()}", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, (stage / rel).read_bytes())
    notes = ", package vendored as scripts/" if vendor else ""
    notes += f", weights from {weights}" if weights is not None else ""
    logger.info("wrote %s (%d files%s, sha1 %s)", target, len(files), notes, sha1sum(target))
    return target


# ---------------------------------------------------------------------------------------------- checks
def verify_release(
    bundle_root: str | os.PathLike = ".", schema: str | os.PathLike | None = None, mode: str = "full"
) -> list[str]:
    """The model zoo's ``ci/verify_bundle.py`` checks of a bundle folder, and the weights check MONAI Label needs.

    Run it where the bundle's configs can import their code (the bundle folder on ``sys.path``). In order:

    * files: ``configs/metadata.json``, ``LICENSE``, ``models/model.pt``, ``configs/inference.json``;
    * ``version`` present and listed in ``changelog``;
    * ``verify_metadata`` against ``schema`` (a local file; skipped when ``None``: MONAI would download it);
    * ``mode="full"``: ``models/model.pt`` loads into ``network_def`` with every key matching, then
      ``verify_net_in_out network_def`` with the image alone (no extra arguments) and ``ckpt_export network_def``
      (TorchScript, as the zoo's ``verify_torchscript``; a shipped ``models/model.ts`` must load).

    Args:
        bundle_root: the bundle folder, default ``"."``.
        schema: the metadata schema file, default ``None``.
        mode: ``"min"`` (files, version, metadata: the zoo's CPU pre-merge) or ``"full"``, default ``"full"``.

    Returns:
        the checks that passed, in order.

    Raises:
        ValueError: the first check that fails, naming it and the file.
    """
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
    from monai.bundle.config_parser import ConfigParser

    root = Path(bundle_root).resolve()
    configs = root / "configs"
    meta_file, config_file, weights = configs / "metadata.json", configs / "inference.json", root / "models/model.pt"
    done: list[str] = []
    for f in (meta_file, root / "LICENSE", weights, config_file):
        if not f.is_file():
            raise ValueError(f"bundle {root.name!r}: {f.relative_to(root)} is missing (the model zoo requires it).")
    done.append("files")
    meta = read_json(meta_file, "bundle metadata")
    if meta.get("version") not in meta.get("changelog", {}):
        raise ValueError(f"{meta_file}: version {meta.get('version')!r} is not listed in 'changelog'.")
    done.append("version")
    if schema is not None:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
        done.append("metadata")
    if mode == "min":
        return done

    import torch

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.read_meta(str(meta_file))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = _key_mismatch(network.state_dict(), state)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: the weights do not fit network_def of {config_file.name} (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); MONAI Label would serve partly random weights. Ship the weights of a network this "
            f"bundle's configs build (train with the bundle; package with the checkpoint's catalog)."
        )
    network.load_state_dict(state)
    done.append("weights")
    kw = {"meta_file": str(meta_file), "config_file": str(config_file), "bundle_root": str(root)}
    verify_net_in_out(net_id="network_def", **kw)
    done.append("net_in_out")
    ckpt_export(net_id="network_def", filepath=str(root / "models" / "verify_model.ts"), ckpt_file=str(weights), **kw)
    if (root / "models" / "model.ts").is_file():
        torch.jit.load(str(root / "models" / "model.ts"))
    done.append("torchscript")
    logger.info("release %s passes %s", root.name, done)
    return done


def _key_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Keys ``expected`` has and ``given`` lacks, keys ``given`` has and ``expected`` lacks, and shape mismatches
    (listed as missing)."""
    missing = sorted(k for k in expected if k not in given)
    missing += sorted(k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape))
    return missing, sorted(k for k in given if k not in expected)

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Release zips of the bundles in the model-zoo layout, with ``uniseg_components`` vendored inside.

``package("bundles/uniseg_finetune_segmentation", out="dist")`` writes
``dist/uniseg_finetune_segmentation_v<version>.zip`` (version from ``configs/metadata.json``) holding::

    uniseg_finetune_segmentation/
        LICENSE
        configs/            every config, metadata.json, logging.conf
        docs/               README.md ...
        models/             model.pt, model.ts, model.onnx when present
        uniseg_components/  this package's source (vendored), catalogs included

The configs import ``uniseg_components``; the vendored copy resolves when the bundle root is on ``sys.path``, which
is the case when MONAI's bundle runner is started from the bundle folder (``cd <name> && python -m monai.bundle run
--config_file configs/inference.json``), with ``PYTHONPATH=<name>``, under MONAI Label (it puts the bundle folder
first on ``sys.path``) and in the model zoo's CI. A machine with MONAI and its dependencies therefore runs the
bundle without installing this package. In the zip's ``metadata.json`` the ``uniseg-components`` entry of
``required_packages_version`` is dropped, as the package is not needed from PyPI.

Left out: ``eval/``, ``demo_data/``, ``demo_data_new/``, ``runs/``, ``mlruns/``, caches (``__pycache__``,
``*.pyc``), temporary files and training-only checkpoints in ``models/`` (only ``model.pt``, ``model.ts``,
``model.onnx`` and ``model_trt.ts`` are shipped). The zip is written to a temporary file and renamed into place,
with sorted entries and fixed timestamps, so the same inputs give the same bytes (and the same sha1 for
``model_info.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from .io import atomic_path, read_json

__all__ = ["PACKAGE_NAME", "MODEL_FILES", "bundle_files", "package", "sha1sum"]

logger = logging.getLogger("uniseg_components.packaging")

PACKAGE_NAME = "uniseg_components"
#: files of ``models/`` that go into a release
MODEL_FILES = ("model.pt", "model.ts", "model.onnx", "model_trt.ts")
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


def _keep(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.startswith(".") for part in rel.parts):
        return False
    if rel.name.endswith(_EXCLUDED_SUFFIXES) or ".tmp" in rel.name:
        return False
    if rel.parts[0] == "models":
        return len(rel.parts) == 2 and rel.name in MODEL_FILES
    if rel.parts[0] == PACKAGE_NAME:  # a vendored copy from an earlier release is replaced by the current package
        return False
    return True


def bundle_files(bundle_dir: str | os.PathLike) -> list[Path]:
    """The bundle's files that go into a release, relative to ``bundle_dir``, sorted."""
    root = Path(bundle_dir)
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and _keep(p.relative_to(root)))


def _package_files() -> list[tuple[Path, Path]]:
    src = Path(__file__).resolve().parent
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if p.suffix not in (".py", ".json", ".typed"):
            continue
        out.append((p, Path(PACKAGE_NAME) / rel))
    return out


def sha1sum(path: str | os.PathLike) -> str:
    """sha1 hex digest of a file (the hash the model zoo records in ``model_info.json``)."""
    h = hashlib.sha1()
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


def package(bundle_dir: str | os.PathLike, out: str | os.PathLike = "dist", vendor: bool = True) -> Path:
    """Write ``<out>/<name>_v<version>.zip`` for the bundle folder ``bundle_dir`` (``<name>`` is its folder name).

    Args:
        bundle_dir: the bundle folder (with ``configs/metadata.json`` and ``LICENSE``).
        out: output folder, created when missing; default ``"dist"``.
        vendor: copy ``uniseg_components`` into the bundle root inside the zip, default ``True``.

    Returns:
        the path of the zip.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``configs/metadata.json`` or no ``LICENSE``.
        ValueError: the metadata is not valid JSON or has no version.
    """
    root = Path(bundle_dir).resolve()
    meta = _read_metadata(root)
    if not (root / "LICENSE").is_file():
        raise FileNotFoundError(f"bundle {str(root)!r} has no LICENSE (required by the bundle specification).")
    name = root.name
    files = bundle_files(root)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}_v{meta['version']}.zip"

    def add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
        info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, data)

    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for rel in files:
            data = (root / rel).read_bytes()
            if rel.as_posix() == "configs/metadata.json" and vendor:
                vendored = dict(meta)
                req = dict(vendored.get("required_packages_version", {}))
                req.pop(PACKAGE_NAME.replace("_", "-"), None)
                req.pop(PACKAGE_NAME, None)
                vendored["required_packages_version"] = req
                data = (json.dumps(vendored, indent=4) + "\n").encode()
            add(zf, f"{name}/{rel.as_posix()}", data)
        if vendor:
            for src, rel in _package_files():
                add(zf, f"{name}/{rel.as_posix()}", src.read_bytes())
    vendored_note = ", package vendored" if vendor else ""
    logger.info("wrote %s (%d bundle files%s, sha1 %s)", target, len(files), vendored_note, sha1sum(target))
    return target

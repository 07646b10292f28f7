# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Files in and out: the one atomic writer, image listing and naming, the one label-map writer, list arguments.

* :func:`atomic_path` is how every file of the project is written (JSON, text, checkpoints, label maps, release
  zips): the content goes to a temporary file in the target's folder, which is renamed into place only when the
  writing succeeded, so a reader (or a rerun after a crash) sees the old complete file or the new one, never half
  of one. :func:`write_text`, :func:`write_json` and :func:`save_torch` are its everyday forms.
* :func:`list_images` turns a folder (of NIfTI files or DICOM series), a file, a datalist or a list into inference
  items; :func:`image_stem` names outputs after their input.
* :func:`save_label_map` writes every label map (2D and 3D, CLI and bundles; the bundles through
  :class:`uniseg_components.transforms.SaveLabelMapd`).

torch and MONAI are imported inside the functions that use them, so reading a catalog or a JSON file stays cheap.
* :func:`as_list` reads list arguments given as lists or comma-separated strings (CLI flags, config values).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and MONAI are imported where used: reading a catalog or JSON needs neither
    import torch

__all__ = [
    "read_json",
    "atomic_path",
    "write_text",
    "write_json",
    "save_torch",
    "as_list",
    "NIFTI_SUFFIXES",
    "image_files",
    "SERIES_SEPARATOR",
    "split_reference",
    "is_series_reference",
    "image_stem",
    "output_path",
    "output_paths",
    "pending_images",
    "list_images",
    "verify_image",
    "load_nifti",
    "save_label_map",
]

#: file name endings read as images when a folder is listed
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path in the same folder to write to, renamed to ``path`` on
    success and removed on any error.

    The temporary name is ``.tmp<pid>-<name>``: hidden, unique per process, and ending like ``path`` (so writers
    that choose the format by suffix, such as nibabel's ``.nii.gz``, write the right one). Parent folders are
    created.

    Example::

        with atomic_path("models/model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """Read a JSON file; every error names ``what`` and the path.

    Args:
        path: the file.
        what: what the file is, for the messages (``"catalog file"``, ``"datalist"``...), default ``"file"``.
        hint: appended to the missing-file message, e.g. how to create the file, default none.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{'; ' + hint if hint else ''}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}.") from e


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> Path:
    """Write ``obj`` as JSON (``indent`` 4, trailing newline) to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def as_list(value: Any) -> list[str]:
    """A list of strings from a list/tuple, a comma-separated string (empty items dropped) or ``None`` (``[]``).

    Example: ``as_list("a, b,,c") == ["a", "b", "c"]``; ``as_list(("x", 2)) == ["x", "2"]``.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def image_files(image: str | os.PathLike | Sequence[str]) -> list[str]:
    """The files of an image (or label) entry: one path, or one path per channel (nnU-Net v2)."""
    return [os.fspath(image)] if isinstance(image, (str, os.PathLike)) else [os.fspath(p) for p in image]


#: separates a folder from the SeriesInstanceUID in the reference of one DICOM series of a folder holding several
#: (``"::"``: MONAI's bundle configs turn a ``"#"`` in any string into ``"::"``, so ``"#"`` is read as an alias)
SERIES_SEPARATOR = "::"


def split_reference(reference: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, SeriesInstanceUID or None)`` of a DICOM series reference: ``"<folder>"`` or ``"<folder>::<uid>"``
    (``"<folder>#<uid>"`` too; see :mod:`uniseg_components.dicom`); any other path comes back as ``(path, None)``."""
    ref = os.fspath(reference)
    if not Path(ref).exists():
        for sep in (SERIES_SEPARATOR, "#"):
            folder, found, uid = ref.rpartition(sep)
            if found and folder and uid and Path(folder).is_dir():
                return Path(folder), uid
    return Path(ref), None


def is_series_reference(source: Any) -> bool:
    """True when ``source`` (a path or string) is a folder or ``<folder>::<uid>``: a DICOM series reference, what
    :class:`uniseg_components.dicom.DicomSeriesReader` reads. Only the form is checked;
    :func:`uniseg_components.dicom.series_files` checks the content."""
    return isinstance(source, (str, os.PathLike)) and split_reference(source)[0].is_dir()


def image_stem(path: str | os.PathLike | Sequence[str]) -> str:
    """An image's name without its image extension: ``"case_001.nii.gz"`` -> ``"case_001"``, ``"x.mha"`` -> ``"x"``; a
    DICOM series folder by its folder name (``"1.2.840.5"`` stays whole), one series of a folder holding several by
    ``"<folder name>_<SeriesInstanceUID>"``; an image stored as one file per channel (nnU-Net v2, a list) by its first
    file, as MONAI's metadata."""
    folder, uid = split_reference(image_files(path)[0])
    if uid is not None:
        return f"{folder.name}_{uid}"
    if folder.is_dir():
        return folder.name
    name = folder.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def output_path(
    source: str | os.PathLike | Sequence[str],
    output_dir: str | os.PathLike,
    postfix: str,
    ext: str = ".nii.gz",
    separate_folder: bool = False,
) -> Path:
    """Where the output of an image goes: ``<output_dir>/[<name>/]<name>_<postfix><ext>``, ``<name>`` its
    :func:`image_stem` (the one naming rule of inference outputs: label maps, DICOM SEG, the skip test)."""
    name = image_stem(source)
    return (Path(output_dir) / name if separate_folder else Path(output_dir)) / f"{name}_{postfix}{ext}"


def pending_images(
    items: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    postfix: str,
    exts: Sequence[str] = (".nii.gz",),
    skip_existing: bool = True,
    separate_folder: bool = False,
) -> list[dict[str, Any]]:
    """The inference items still to do: with ``skip_existing``, those whose outputs (one per extension of ``exts``,
    at :func:`output_path`; ``".dcm"``, the DICOM SEG, for DICOM series only) do not all exist; every item otherwise.
    Outputs are written atomically, so an existing one is complete: an interrupted run continues where it stopped.

    Args:
        items: ``[{"image": ...}, ...]`` as :func:`list_images` gives.
        output_dir, postfix, separate_folder: as :func:`output_path`.
        exts: the outputs each image gets, default ``(".nii.gz",)`` (add ``".dcm"`` for DICOM SEG).
        skip_existing: default ``True``.
    """
    if not skip_existing:
        return [dict(it) for it in items]
    return [
        dict(it)
        for it in items
        if not all(p.is_file() for p in output_paths(it["image"], output_dir, postfix, exts, separate_folder))
    ]


def output_paths(
    source: Any,
    output_dir: str | os.PathLike,
    postfix: str,
    exts: Sequence[str] = (".nii.gz",),
    separate_folder: bool = False,
) -> list[Path]:
    """The outputs inference writes for an image, one per extension of ``exts`` (:func:`output_path`), except the
    DICOM SEG (``".dcm"``) of an image that is not a DICOM series."""
    series = is_series_reference(source)
    return [
        output_path(source, output_dir, postfix, e, separate_folder) for e in as_list(exts) if e != ".dcm" or series
    ]


def list_images(
    source: str | os.PathLike | Sequence[Any],
    pattern: str = "*.nii*",
    keys: Sequence[str] = ("image", "task"),
    must_exist: bool = False,
) -> list[dict[str, Any]]:
    """Inference items ``[{"image": path, ...}, ...]`` from a folder, a datalist JSON file or a list.

    DICOM: a folder without files matching ``pattern`` is searched for DICOM series (itself, or its study
    sub-folders, recursively), one item per series (:func:`uniseg_components.dicom.series_references`); a folder
    given in a list or datalist is such a search too. Such a listed folder with no DICOM image stays an item of its
    own, so that reading it fails with its name; ``source`` itself holding neither images nor DICOM files raises.

    Args:
        source: a folder (its files matching ``pattern``, sorted; else its DICOM series), a ``.json`` file holding a
            list of paths or items (or a dict with a ``"test"``, ``"testing"``, ``"validation"`` or ``"val"`` list),
            a ``.csv`` file of paths (an ``image`` column, and ``task``, under a header row, else the first column;
            relative paths from the CSV's folder), a single image file or series reference, or a list of paths /
            item dicts (a comma-separated string of paths is a list too).
        pattern: glob for folders, default ``"*.nii*"``.
        keys: the entries an item keeps, default ``("image", "task")`` (a prepared datalist's items also carry
            labels, which inference does not read; an item's own task overrides the config's default).
        must_exist: check that every listed image file exists, default ``False`` (the reader reports it later).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist, or (``must_exist``) listed files do not; the
            message names them.
        ValueError: the source holds no image, or an item has no ``"image"``.
    """
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists() and "," in str(source):
        source = as_list(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no image folder, image or datalist at {str(path)!r}.")
        if path.is_dir():
            from .dicom import series_references

            entries: Sequence[Any] = sorted(str(p) for p in path.glob(pattern) if p.is_file())
            entries = entries or series_references(path)
            if not entries:
                raise ValueError(f"no image found in {str(path)!r} (no file matching {pattern!r}, no DICOM file).")
            return [{"image": e} for e in entries]
        elif path.suffix.lower() == ".csv":
            entries = _csv_entries(path)
        elif path.suffix == ".json":
            loaded = read_json(path, "image list")
            if isinstance(loaded, dict):
                key = next((k for k in ("test", "testing", "validation", "val") if k in loaded), None)
                if key is None:
                    raise ValueError(f"{path}: expected a list or a dict with a 'test' or 'validation' list.")
                loaded = loaded[key]
            entries = loaded
        else:
            entries = [str(path)]
    else:
        entries = list(source)
    items = [
        {k: v for k, v in e.items() if k in keys} if isinstance(e, Mapping) else {"image": str(e)} for e in entries
    ]
    if any("image" not in item for item in items):
        raise ValueError(f"every item of {source!r} needs an 'image' entry.")
    items = [it for item in items for it in _series_items(item)]
    if not items:
        raise ValueError(f"no image found in {source!r} (pattern {pattern!r}).")
    missing = [str(it["image"]) for it in items if must_exist and not split_reference(str(it["image"]))[0].exists()]
    if missing:
        raise FileNotFoundError(f"image file(s) {missing} do not exist.")
    return items


def _csv_entries(path: Path) -> list[Any]:
    """The items of a CSV list of images: with a header row naming an ``image`` column (and optionally ``task``),
    those columns; without one, the first column. Relative paths are taken from the CSV file's folder.

    Raises:
        ValueError: the file is not UTF-8 text; the message names it.
    """
    import csv

    try:  # utf-8-sig: a spreadsheet's byte order mark is not part of the first cell
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise ValueError(f"image list {str(path)!r} is not a UTF-8 CSV file: {e}.") from e
    header = [c.strip().lower() for c in rows[0]] if rows else []
    columns = {"image": header.index("image")} if "image" in header else {"image": 0}
    if "task" in header:
        columns["task"] = header.index("task")
    rows = rows[1:] if "image" in header else rows

    first = 2 if "image" in header else 1
    empty = [
        n
        for n, row in enumerate(rows, start=first)
        if len(row) <= columns["image"] or not row[columns["image"]].strip()
    ]
    if empty:
        raise ValueError(f"image list {str(path)!r}: no image path in row(s) {empty}.")

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else path.parent / p)

    return [
        {k: (resolve(row[i].strip()) if k == "image" else row[i].strip()) for k, i in columns.items() if i < len(row)}
        for row in rows
    ]


def _series_items(item: dict[str, Any]) -> list[dict[str, Any]]:
    """``item`` once per DICOM series of its folder (``item`` itself when its image is not a folder, or a folder
    holding no DICOM file)."""
    image = item["image"]
    if not isinstance(image, (str, os.PathLike)) or not Path(image).is_dir():
        return [item]
    from .dicom import series_references

    return [{**item, "image": ref} for ref in series_references(image)] or [item]


def _gzip_bytes(path: Path, keep: bool = True) -> bytes:
    """The decompressed content of a ``.gz`` file, read to its end so that the CRC and length are verified; with
    ``keep=False`` read in 16 MB blocks and dropped (``b""`` returned), so a check holds no whole volume."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            if keep:
                return f.read()
            while f.read(1 << 24):
                pass
            return b""
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile, CRC mismatch, truncation
        raise ValueError(f"{str(path)!r} is damaged or truncated ({type(e).__name__}: {e}).") from e


def verify_image(path: str | os.PathLike) -> None:
    """Check that an image file can be read completely: it exists, a gzip-compressed file (``.nii.gz``...) decompresses
    to its end with a matching CRC and length (nibabel reads only the bytes it needs and never checks them), and its
    header loads.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is damaged, truncated or not a readable image; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist.")
    if path.suffix == ".gz":
        _gzip_bytes(path, keep=False)
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            nib.load(str(path))
        except Exception as e:  # header errors of any kind
            raise ValueError(f"{str(path)!r} is not a readable NIfTI image ({type(e).__name__}: {e}).") from e


def load_nifti(path: str | os.PathLike) -> tuple[Any, Any]:
    """The array and affine of a NIfTI file read completely with integrity checks (see :func:`verify_image`): a
    ``.nii.gz`` file is decompressed once, to its end, with its CRC verified.

    Returns:
        ``(array, affine)`` as numpy arrays.

    Raises:
        FileNotFoundError, ValueError: as :func:`verify_image`; the message names the file.
    """
    import nibabel as nib
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist.")
    raw = _gzip_bytes(path) if path.suffix == ".gz" else None
    try:
        if raw is not None:
            nifti2 = raw[:4] == (540).to_bytes(4, "little")  # sizeof_hdr of a NIfTI-2 header
            img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)
        else:
            img = nib.load(str(path))
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=float)
    except Exception as e:  # header and size errors of any kind
        raise ValueError(f"{str(path)!r} is not a readable NIfTI image ({type(e).__name__}: {e}).") from e


def save_label_map(label: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a ``(1, *spatial)`` label map (or ``(C, *spatial)`` masks, one per channel) as NIfTI atomically
    (:func:`atomic_path`).

    Written with nibabel directly: a 2D map gets its 2D affine embedded in a 4x4 one (MONAI's writer fails on some
    2D maps, e.g. those of ``(X, Y, 1, C)`` RGB files). Several channels are stored channel-last, ``(X, Y, Z, C)``
    (2D: ``(X, Y, 1, C)``, nnU-Net's layout). Values in [0, 255] are stored as ``uint8``, else ``int16``.

    Args:
        label: integer label map, a MetaTensor carrying the affine of the grid it lies on (identity otherwise).
        path: output ``.nii.gz`` path; parent folders are created.
    """
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor

    arr = torch.as_tensor(label).detach().cpu().numpy()
    if arr.shape[0] == 1:
        arr = arr[0]
    else:  # channel-last, with a singleton third axis for 2D maps
        arr = np.moveaxis(arr, 0, -1)
        arr = arr[:, :, None] if arr.ndim == 3 else arr
    affine = np.eye(4)
    if isinstance(label, MetaTensor):
        a = np.asarray(label.affine.detach().cpu().numpy(), dtype=np.float64)
        r = a.shape[0] - 1  # spatial rank of the affine
        affine[:r, :r], affine[:r, 3] = a[:r, :r], a[:r, r]
    dtype = np.uint8 if int(arr.max(initial=0)) < 256 and int(arr.min(initial=0)) >= 0 else np.int16
    img = nib.Nifti1Image(np.rint(arr).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)

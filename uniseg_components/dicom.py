# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""DICOM in and out: series folders as inference inputs (read with ITK), DICOM SEG as an output (written with
highdicom).

* A **series reference** names one DICOM series: a folder that holds one series (its DICOM files directly in it),
  or ``<folder>::<SeriesInstanceUID>`` for one series of a folder that holds several. :func:`find_series` lists the
  series of a folder, :func:`series_references` the references of a folder of studies (one sub-folder per study),
  and :func:`series_files` checks a series and returns its files sorted along the slice normal.
* :class:`DicomSeriesReader` is a MONAI ``ImageReader`` (ITK underneath) that reads a series reference; every
  ``LoadImage`` of the project has it (:func:`with_series_reader`), so training, evaluation, inference and the bundles
  read DICOM series wherever they read NIfTI files. The image's affine is RAS, as for NIfTI.
* :func:`write_dicom_seg` writes a label map on a series' grid as a DICOM Segmentation object (one segment per
  label, named after the catalog) that references the source series, and reads it back to check it.

pydicom and highdicom are imported only when a DICOM series is read or written, so NIfTI work needs neither.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ITKReader
from monai.utils import ensure_tuple

from .io import SERIES_SEPARATOR, atomic_path, is_series_reference, split_reference

__all__ = [
    "DicomSeries",
    "NoImageSeries",
    "DicomSeriesReader",
    "is_dicom_file",
    "is_series_reference",
    "find_series",
    "series_references",
    "series_files",
    "with_series_reader",
    "write_dicom_seg",
    "read_dicom_seg",
]

logger = logging.getLogger(__name__)

#: relative tolerance on slice distances: a gap of more than (1 + tol) x the slice spacing is a missing slice
SPACING_TOLERANCE = 0.1

_HEADER_TAGS = (
    "SOPClassUID",
    "SeriesInstanceUID",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file with the DICOM preamble (``"DICM"`` at byte 128, DICOM Part 10)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM image series of a folder.

    Attributes:
        folder: the folder holding its files.
        uid: its SeriesInstanceUID.
        files: its files, in the folder's (sorted) order.
        modality: the DICOM Modality of its first file (``"CT"``, ``"MR"``, ``"PT"``...).
        shared: whether the folder holds other image series too (then the reference carries the UID).
        unreadable: files of the folder with a DICOM preamble whose header could not be read (they may belong to
            this series: :func:`series_files` refuses the series while there are any).
    """

    folder: Path
    uid: str
    files: tuple[str, ...]
    modality: str = ""
    shared: bool = False
    unreadable: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """``"<folder>"``, or ``"<folder>::<uid>"`` when the folder holds several series."""
        return f"{self.folder}{SERIES_SEPARATOR}{self.uid}" if self.shared else str(self.folder)


class NoImageSeries(ValueError):
    """A folder holds DICOM files, but none of an image series (a DICOMDIR, SEG, SR or RTSTRUCT objects...)."""


@lru_cache(maxsize=65536)
def _cached_header(path: str, mtime_ns: int, size: int) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))


def _read_header(path: str) -> Any:
    """The header tags the checks need (cached per file, path, modification time and size: listing, checking and
    reading a series read each header once per process)."""
    st = os.stat(path)
    return _cached_header(str(path), st.st_mtime_ns, st.st_size)


def find_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM image series whose files lie directly in ``folder`` (sub-folders are not searched), by
    SeriesInstanceUID. Files that are not images placed in space (no ImagePositionPatient / ImageOrientationPatient:
    a DICOMDIR, DICOM SEG, SR, RTSTRUCT, a scanned document...) are left out.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        NoImageSeries: it holds DICOM files, none of an image series; the message names it.
        ValueError: it holds no DICOM file, or only unreadable ones; the message names it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM series folder {str(folder)!r} does not exist.")
    groups: dict[str, list[str]] = {}
    modality: dict[str, str] = {}
    unreadable: list[str] = []
    other = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.upper() == "DICOMDIR" or not is_dicom_file(path):
            other += path.name.upper() == "DICOMDIR"
            continue
        try:
            header = _read_header(str(path))
        except Exception:  # noqa: BLE001 - reported with the series (series_files)
            header = None
        if header is None or "SOPClassUID" not in header:  # pydicom reads a truncated file as an empty dataset
            unreadable.append(str(path))
            continue
        uid = str(getattr(header, "SeriesInstanceUID", "") or "")
        if not uid or "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            other += 1
            continue
        groups.setdefault(uid, []).append(str(path))
        modality.setdefault(uid, str(getattr(header, "Modality", "") or ""))
    if not groups:
        if unreadable:
            raise ValueError(
                f"{str(folder)!r} holds no readable DICOM image series: {len(unreadable)} DICOM file(s) could not be "
                f"read (e.g. {unreadable[0]!r})."
            )
        if other:
            raise NoImageSeries(f"{str(folder)!r} holds {other} DICOM file(s), none of an image series.")
        raise ValueError(f"{str(folder)!r} holds no readable DICOM series (no file with a DICOM preamble).")
    shared = len(groups) > 1
    return [
        DicomSeries(folder, uid, tuple(files), modality[uid], shared, tuple(unreadable))
        for uid, files in sorted(groups.items())
    ]


def series_references(folder: str | os.PathLike) -> list[str]:
    """The series references under ``folder``: its own series when DICOM files lie directly in it, and those of
    every sub-folder holding DICOM files (searched recursively, sorted by path): one reference per image series.

    A folder whose DICOM files hold no image series (a DICOMDIR, SEG or SR objects...) is left out (logged); one
    whose files cannot be read is listed, so that inference reports it by name. Series of folders with the same
    name (``p1/CT``, ``p2/CT``) are referenced with their UID (``<folder>::<uid>``), so that their outputs get
    different names.

    Returns:
        an empty list when no DICOM image series lies in or under ``folder``.
    """
    folder = Path(folder)
    found: list[DicomSeries | str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if any(is_dicom_file(Path(root) / f) for f in sorted(files)):
            try:
                found.extend(find_series(root))
            except NoImageSeries as e:
                logger.info("%s", e)
            except ValueError:
                found.append(root)  # unreadable: listed, so that inference reports it by name
    names = Counter(Path(s.folder if isinstance(s, DicomSeries) else s).name for s in found)
    return [
        s if isinstance(s, str) else replace(s, shared=s.shared or names[s.folder.name] > 1).reference for s in found
    ]


def _series(reference: str | os.PathLike) -> DicomSeries:
    folder, uid = split_reference(reference)
    series = find_series(folder)
    if uid is None:
        if len(series) > 1:
            raise ValueError(
                f"{str(folder)!r} holds {len(series)} DICOM series; name one as '<folder>::<SeriesInstanceUID>' "
                f"(SeriesInstanceUIDs: {[s.uid for s in series]})."
            )
        return series[0]
    match = [s for s in series if s.uid == uid]
    if not match:
        raise ValueError(f"{str(folder)!r} holds no DICOM series {uid!r} (it holds {[s.uid for s in series]}).")
    return match[0]


def series_files(reference: str | os.PathLike) -> list[str]:
    """The files of a series reference, sorted along the slice normal, after checking that they form one regular
    volume: every slice readable with the same orientation, size and pixel spacing, no two at the same position,
    each slice straight above the previous one (no gantry tilt), and equal distances between neighbouring slices (a
    larger gap is reported as missing slices).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no readable series, several series and no UID, unreadable files in the folder, or an irregular
            volume (sheared by a gantry tilt, missing slices, uneven spacing...); the message names the series and
            what is wrong.
    """
    series = _series(reference)
    name = os.fspath(reference)
    if series.unreadable:
        raise ValueError(
            f"DICOM series {name!r}: {len(series.unreadable)} DICOM file(s) of its folder cannot be read (e.g. "
            f"{series.unreadable[0]!r}); the series may lack slices."
        )
    headers = []
    for path in series.files:
        try:
            headers.append((path, _read_header(path)))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"DICOM series {name!r}: {path!r} is not readable ({type(e).__name__}: {e}).") from e
    for path, h in headers:
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns") if t not in h]
        if missing:
            raise ValueError(f"DICOM series {name!r}: {path!r} lacks {missing}; it cannot be placed in a volume.")
    first = headers[0][1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    size = (int(first.Rows), int(first.Columns))
    spacing = np.asarray(getattr(first, "PixelSpacing", [1.0, 1.0]), dtype=float)
    for path, h in headers[1:]:
        if not np.allclose(np.asarray(h.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise ValueError(f"DICOM series {name!r}: {path!r} has another ImageOrientationPatient than the others.")
        if (int(h.Rows), int(h.Columns)) != size:
            raise ValueError(
                f"DICOM series {name!r}: {path!r} is {int(h.Rows)}x{int(h.Columns)} pixels, the others "
                f"{size[0]}x{size[1]}."
            )
        if not np.allclose(np.asarray(getattr(h, "PixelSpacing", [1.0, 1.0]), dtype=float), spacing, rtol=1e-4):
            raise ValueError(f"DICOM series {name!r}: {path!r} has another PixelSpacing than the others.")
    normal = np.cross(iop[:3], iop[3:])
    ipp = {path: np.asarray(h.ImagePositionPatient, dtype=float) for path, h in headers}
    position = {path: float(np.dot(p, normal)) for path, p in ipp.items()}
    ordered = sorted(position, key=position.__getitem__)
    if len(ordered) > 1:
        steps = np.diff(np.stack([ipp[p] for p in ordered]), axis=0)
        in_plane = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
        if float(in_plane.max()) > 1e-2 * float(spacing.min()):
            raise ValueError(
                f"DICOM series {name!r}: the slices are shifted in their plane from one to the next (up to "
                f"{float(in_plane.max()):.3f} mm: a gantry tilt or a sheared volume), which a voxel grid cannot "
                "hold; resample it to an orthogonal grid first."
            )
        z = np.array([position[p] for p in ordered])
        gaps = np.diff(z)
        same = np.flatnonzero(gaps < 1e-3)
        if same.size:
            a, b = ordered[same[0]], ordered[same[0] + 1]
            raise ValueError(f"DICOM series {name!r}: {a!r} and {b!r} lie at the same position ({z[same[0]]:.3f} mm).")
        step = float(np.min(gaps))
        off = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step)
        if off.size:
            i = int(off[0])
            count = gaps[i] / step - 1
            if abs(count - round(count)) < SPACING_TOLERANCE and round(count) >= 1:
                raise ValueError(
                    f"DICOM series {name!r}: {int(round(count))} slice(s) missing between {ordered[i]!r} and "
                    f"{ordered[i + 1]!r} (gap {gaps[i]:.3f} mm, slices {step:.3f} mm apart)."
                )
            raise ValueError(
                f"DICOM series {name!r}: inconsistent slice spacing, from {step:.3f} to {float(np.max(gaps)):.3f} mm "
                f"(first irregular gap after {ordered[i]!r})."
            )
    return ordered


class DicomSeriesReader(ITKReader):
    """MONAI ``ImageReader`` of DICOM series references (see the module docstring): the series is checked and sorted
    by :func:`series_files`, then read by ITK, so the image's affine (RAS) and metadata are those of MONAI's
    ``ITKReader``. Files and other inputs are left to the other readers (:meth:`verify_suffix` is ``False``).

    Args:
        kwargs: passed to ``ITKReader`` (e.g. ``reverse_indexing``), default none.
    """

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """True when every name is a series reference (a folder or ``<folder>::<uid>``)."""
        return all(is_series_reference(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> Any:
        """The ITK image of each series reference in ``data`` (one image, or a list for several)."""
        import itk

        kwargs_ = {**self.kwargs, **kwargs}
        images = []
        for ref in ensure_tuple(data):
            files = series_files(ref)
            images.append(itk.imread(files[0] if len(files) == 1 else files, **kwargs_))
        return images if len(images) > 1 else images[0]


def with_series_reader(loader: Any) -> Any:
    """``loader`` (a ``LoadImage`` or ``LoadImaged`` built with ``reader=None``) with :class:`DicomSeriesReader`
    registered: MONAI then picks by suffix as before and tries this reader first, which takes series references only.
    A loader with a reader of its own is returned unchanged (MONAI would try every reader on every file, logging each
    miss); that reader reads folders itself."""
    inner = getattr(loader, "_loader", loader)
    if getattr(inner, "auto_select", False):
        loader.register(DicomSeriesReader())
    return loader


def _property_codes(label: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a catalog label name: abnormal structures (tumour, lesion, ...) or
    an anatomical structure."""
    from pydicom.sr.codedict import codes

    lower = label.lower()
    if any(w in lower for w in ("tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "neoplasm", "mass")):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    return codes.SCT.AnatomicalStructure, codes.SCT.Organ


def _slice_index(label_affine: np.ndarray, datasets: Sequence[Any], name: str) -> list[int]:
    """For each source slice, the index along the label map's third axis that lies on it (checked: the label map's
    in-plane axes follow the slices' rows and columns, and every slice falls on a grid plane)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ label_affine  # voxel -> patient (LPS), as DICOM
    inverse = np.linalg.inv(lps)
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    axes = lps[:3, :2] / np.linalg.norm(lps[:3, :2], axis=0)
    if not (np.allclose(axes[:, 0], iop[:3], atol=1e-3) and np.allclose(axes[:, 1], iop[3:], atol=1e-3)):
        raise ValueError(f"{name}: the label map's grid is not the series' grid (its axes are not the slices' axes).")
    index = []
    for ds in datasets:
        ijk = inverse @ np.append(np.asarray(ds.ImagePositionPatient, dtype=float), 1.0)
        k = int(round(ijk[2]))
        if not np.allclose(ijk[:3], [0.0, 0.0, k], atol=1e-2):
            raise ValueError(f"{name}: slice {ds.filename!r} does not lie on a plane of the label map's grid.")
        index.append(k)
    return index


def write_dicom_seg(
    label: Any,
    reference: str | os.PathLike,
    labels: Mapping[int, str],
    path: str | os.PathLike,
    description: str = "",
    algorithm: str = "uniseg_components",
) -> Path:
    """Write the label map of a DICOM series as a DICOM Segmentation (SEG) object that references the series, one
    segment per label, then read it back and check it (:func:`read_dicom_seg`).

    Args:
        label: ``(1, X, Y, Z)`` integer label map, or ``(C, X, Y, Z)`` binary masks that may overlap (one segment per
            channel), a MetaTensor whose affine is the series' RAS affine, as read by :class:`DicomSeriesReader`.
        reference: the series reference the map was computed from.
        labels: label value -> name (from the catalog; value 0, background, is left out). Segment ``n`` is the
            ``n``-th value in increasing order (of masks: channel ``n - 1``), labelled with its name.
        path: the ``.dcm`` file to write (atomically).
        description: the SEG's SeriesDescription, default the segment names.
        algorithm: the algorithm name recorded in every segment, default ``"uniseg_components"``.

    Raises:
        ValueError: the map is not on the series' grid, holds values without a name, or the written object does not
            read back as written; the message names the series.
    """
    import highdicom as hd
    import pydicom
    import torch
    from pydicom.sr.codedict import codes

    from . import __version__

    name = f"DICOM SEG of {os.fspath(reference)!r}"
    files = series_files(reference)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # the SEG needs their attributes only
    arr = np.rint(torch.as_tensor(label).detach().cpu().numpy()).astype(np.int64)
    if arr.ndim != 4:
        raise ValueError(f"{name}: expected a (1, X, Y, Z) label map or (C, X, Y, Z) masks, got {tuple(arr.shape)}.")
    affine = np.asarray(getattr(label, "affine", np.eye(4)), dtype=float)
    values = sorted(int(v) for v in labels if int(v) != 0)
    if tuple(arr.shape[1:3]) != (int(sources[0].Columns), int(sources[0].Rows)):
        raise ValueError(
            f"{name}: the label map is {arr.shape[1]} x {arr.shape[2]} voxels in plane, the series' slices "
            f"{int(sources[0].Columns)} x {int(sources[0].Rows)} pixels (columns x rows)."
        )
    index = _slice_index(affine, sources, name)
    if max(index) >= arr.shape[3] or min(index) < 0:
        raise ValueError(f"{name}: the series has slices outside the label map ({arr.shape[3]} slices).")
    if arr.shape[0] == 1:  # a label map: segment n is the n-th named value
        unknown = sorted(set(np.unique(arr).tolist()) - {0, *values})
        if unknown:
            raise ValueError(f"{name}: label values {unknown} have no name (named: {values}).")
        lut = np.zeros(max([0, *values, int(arr.max(initial=0))]) + 1, dtype=np.uint16)
        lut[values] = np.arange(1, len(values) + 1)
        # (slices, rows, columns), values = segment numbers: DICOM rows follow the map's Y axis
        frames = np.stack([lut[arr[0, :, :, k].T] for k in index]).astype(np.uint8 if len(values) < 256 else np.uint16)
    else:  # overlapping masks (Hermes' per-target output): segment n is channel n-1
        if arr.shape[0] != len(values) or not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{name}: {arr.shape[0]} channel(s) of masks need binary values and one name each (named: {values})."
            )
        frames = np.stack([np.moveaxis(arr[:, :, :, k], 0, -1).transpose(1, 0, 2) for k in index]).astype(np.uint8)
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.DCM.ArtificialIntelligence, version=__version__
    )
    segments = []
    for n, v in enumerate(values, start=1):
        category, kind = _property_codes(str(labels[v]))
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=str(labels[v])[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="uniseg_components",
        manufacturer_model_name=algorithm[:64],
        software_versions=__version__,
        device_serial_number="0",
        series_description=(description or ", ".join(str(labels[v]) for v in values))[:64],
        omit_empty_frames=False,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
        read_dicom_seg(tmp, expect_labels=[str(labels[v])[:64] for v in values], expect_series=sources[0])
    return path


def read_dicom_seg(
    path: str | os.PathLike, expect_labels: Sequence[str] | None = None, expect_series: Any = None
) -> dict[str, Any]:
    """Read a DICOM SEG file back: its segment labels, referenced series and masks.

    Args:
        path: the SEG file.
        expect_labels: if given, the segment labels it must hold, in segment order.
        expect_series: if given, a dataset of the source series it must reference.

    Returns:
        ``{"labels": [segment labels], "series_uid": referenced SeriesInstanceUID, "frames": number of frames}``.

    Raises:
        ValueError: the file is not a readable SEG, or differs from the expectations; the message names it.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{str(path)!r} is not a readable DICOM SEG ({type(e).__name__}: {e}).") from e
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if expect_labels is not None and list(labels) != list(expect_labels):
        raise ValueError(f"{str(path)!r}: segments {labels} read back, {list(expect_labels)} written.")
    if expect_series is not None and series_uid != str(expect_series.SeriesInstanceUID):
        raise ValueError(
            f"{str(path)!r} references series {series_uid}, not the source series {expect_series.SeriesInstanceUID}."
        )
    return {"labels": labels, "series_uid": series_uid, "frames": int(getattr(seg, "NumberOfFrames", 0))}

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""A small, self-contained demo collection: MSD-format datasets written in seconds, with no download.

:func:`write_demo_collection` writes one folder per task of the built-in ``"demo"`` catalog (six tasks, see
``catalogs/demo.json``), each in the Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``), plus ``tasks.json``, the catalog of the tasks written::

    <out_dir>/
        tasks.json
        Demo01_AbdomenCT/    dataset.json  imagesTr/abdomen_ct_000.nii.gz ...  labelsTr/abdomen_ct_000.nii.gz ...
        Demo02_BrainMR/      ...
        Demo03_LesionPETCT/  ...
        Demo04_FetalUS2D/    ...
        Demo05_ChestXR2D/    ...
        Demo06_SkinLesion2D/ ...
        Demo07_KidneyCT/     (only with catalog="demo_new_tasks")

The tasks:

* ``abdomen_ct``: synthetic abdominal CT in Hounsfield units (air, fat, muscle, bowel, spine, aorta, kidneys,
  spleen) with a liver-like organ (label 1) holding 1-2 hypodense tumours (label 2, 60-80 HU below it) in every
  case. Written at a per-case voxel spacing within +-20% of the task's target spacing so that resampling is exercised.
* ``brain_mr``: real anatomy, the MNI152 ICBM 2009 T1 template and its grey / white matter probability maps
  shipped inside nilearn (an optional dependency, the ``demo`` extra), deformed per case by a random affine
  and a smooth elastic field, with bias field, gamma, scaling and Rician noise. Labels: CSF (brain mask minus
  grey and white matter), grey matter, white matter.
* ``lesion_petct``: two-channel CT + PET (SUV) of a torso (lungs, heart, liver, kidneys, bladder), 1 to 4
  FDG-avid lesions per case (label 1), PET blurred by the scanner resolution and with count noise.
* ``fetal_us``: 2D ultrasound sector image with speckle, a bright skull ring around the fetal head in
  amniotic fluid; the label is the filled head ellipse.
* ``chest_xr``: 2D posteroanterior chest radiograph (a projection: soft tissue, mediastinum, spine, ribs,
  clavicles, air-filled lungs with vessels, upper abdomen) with exposure gradient and quantum noise, patient size
  and position varying per case. Labels: lungs (the lung fields not hidden by the heart), heart.
* ``skin_lesion``: 2D RGB dermoscopy image (3 channels, values 0-255): skin of a random tone with texture,
  redness, dark hairs, vignetting and sometimes the black corners of a round dermoscope; a pigmented lesion with
  an irregular, partly fuzzy border, colour variegation, pigment network and globules (label 1).

The built-in catalog ``"demo_new_tasks"`` holds one more task, written only when asked for
(``write_demo_collection(out, catalog="demo_new_tasks")``) so that the bundles' default training data stays the
tasks above:

* ``kidney_ct``: abdominal CT from the same generator as ``abdomen_ct`` but in a nephrographic phase (renal
  parenchyma 170-220 HU), with the kidneys (label 1, 0-2 renal cysts included) and the spleen (label 2) annotated
  and the liver visible but unlabelled: the new dataset of the incremental-learning demo.

Array axis order is MONAI's ``(x, y, z)`` with ``x`` towards the patient's right, ``y`` anterior and ``z``
superior (RAS); the NIfTI affines are diagonal (voxel spacing) so ``Orientationd("RAS")`` is a no-op.
Multi-channel images are 4-D NIfTI with the channel last (MSD convention); 2D images are 2-D NIfTI, except
multi-channel 2D images, stored as ``(X, Y, 1, C)`` (nnU-Net's 2D layout, which ``transforms.Squeeze2Dd``
reads back as ``(C, X, Y)``; a 3-D ``(X, Y, C)`` file would be read as a one-channel volume).
Files are byte-for-byte deterministic given the seed and the numpy / torch versions (the gzip header carries
no time stamp), and case ``i`` of a task does not depend on how many cases are written.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .tasks import TaskCatalog, TaskSpec

__all__ = [
    "DEMO_CATALOG",
    "DEMO_TASKS_FILE",
    "DEFAULT_NUM_CASES",
    "write_demo_collection",
    "demo_collection_exists",
]

logger = logging.getLogger(__name__)

#: Name of the built-in catalog that describes the demo tasks.
DEMO_CATALOG = "demo"
#: File name of the catalog written at the root of a demo collection.
DEMO_TASKS_FILE = "tasks.json"
#: Cases written per task when ``num_cases`` is not given.
DEFAULT_NUM_CASES: dict[str, int] = {
    "abdomen_ct": 10,
    "brain_mr": 10,
    "lesion_petct": 10,
    "fetal_us": 16,
    "chest_xr": 16,
    "skin_lesion": 16,
    "kidney_ct": 10,
}

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MNI_NOTICE = (
    "MNI ICBM152 2009 template, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University; use and redistribution are permitted provided this copyright "
    "notice is retained (distributed with nilearn)."
)


# ====================================================================================================== helpers
def _world_grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Sparse (broadcastable) world coordinates in mm of a grid centred on 0, one array per axis."""
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(s)) for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _resize(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear up/down-sampling of a 2D or 3D array to ``shape`` (corners aligned)."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, align_corners=True)[0, 0].numpy()


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], coarse: int | Sequence[int] = 4) -> np.ndarray:
    """Smooth random field: standard normal values on a coarse lattice, linearly interpolated to ``shape``."""
    if isinstance(coarse, int):
        coarse = [coarse] * len(shape)
    return _resize(rng.standard_normal([max(2, int(c)) for c in coarse]), shape)


def _gaussian_blur(arr: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur of a 2D / 3D array; ``sigma`` in voxels per axis (0 skips an axis)."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    nd = arr.ndim
    conv = F.conv3d if nd == 3 else F.conv2d
    for ax, s in enumerate(sigma):
        if s <= 0:
            continue
        r = max(1, int(math.ceil(3.0 * s)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / float(s)) ** 2)
        kshape = [1, 1] + [1] * nd
        kshape[2 + ax] = 2 * r + 1
        pad = [0] * (2 * nd)  # F.pad lists the last axis first
        pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), (k / k.sum()).view(kshape))
    return x[0, 0].numpy()


def _correlated_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float = 0.7) -> np.ndarray:
    """Unit-variance Gaussian noise with a short correlation length (``sigma`` voxels)."""
    n = _gaussian_blur(rng.standard_normal(tuple(shape), dtype=np.float32), [sigma] * len(shape))
    return n / max(float(n.std()), 1e-6)


def _rot_xy(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _ellipsoid(
    coords: Sequence[np.ndarray],
    center: Sequence[float],
    semi: Sequence[float],
    angle: float = 0.0,
    wobble: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Implicit ellipsoid / ellipse ``q`` (inside where ``q < 1``), rotated by ``angle`` about the last axis
    of the x-y plane, with an additive ``wobble`` field that makes the boundary irregular."""
    d = [c - float(m) for c, m in zip(coords, center)]
    d[0], d[1] = _rot_xy(d[0], d[1], angle)
    q = sum((di / float(si)) ** 2 for di, si in zip(d, semi))
    return q + wobble


def _pick_voxel(rng: np.random.Generator, mask: np.ndarray, coords: Sequence[np.ndarray]) -> list[float] | None:
    """World coordinates of a random voxel of ``mask`` (``None`` when empty)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    sub = np.unravel_index(int(idx[rng.integers(idx.size)]), mask.shape)
    return [float(c.reshape(-1)[i]) for c, i in zip(coords, sub)]


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine with ``spacing`` on the diagonal and the volume centred on the world origin."""
    aff = np.eye(4)
    for i, (s, n) in enumerate(zip(spacing, shape)):
        aff[i, i] = s
        aff[i, 3] = -(n - 1) / 2.0 * s
    return aff


def _write_nifti(path: Path, arr: np.ndarray, spacing: Sequence[float]) -> None:
    """Write ``arr`` as ``.nii.gz`` with a diagonal affine; gzip without time stamp so files are reproducible."""
    img = nib.Nifti1Image(arr, _affine(spacing, arr.shape[: len(spacing)]))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


# ====================================================================================================== torso
def _torso(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], thorax: bool) -> dict[str, Any]:
    """Synthetic torso: an HU map (no noise, no liver yet) and the tissue masks the tasks need.

    The liver is returned as a mask only (``"liver"``) so that callers paint it (and any lesion) last.
    With ``thorax`` the field of view runs from the lungs and heart down to the bladder.
    """
    coords = _world_grid(shape, spacing)
    x, y, z = coords
    full = tuple(shape)
    zlo, zhi = float(z.min()), float(z.max())

    a, b = rng.uniform(78, 92), rng.uniform(58, 70)  # body semi-axes (mm), x (left-right) and y (antero-posterior)
    fat = rng.uniform(7, 16)
    wall = rng.uniform(6, 10)
    y0 = rng.uniform(-4, 4)
    r_body = np.sqrt((x / a) ** 2 + ((y - y0) / b) ** 2) * (1 + 0.02 * _smooth_noise(rng, full, (4, 4, 3)))
    r_visc = np.sqrt((x / (a - fat)) ** 2 + ((y - y0) / (b - fat)) ** 2) * (1 + 0.03 * _smooth_noise(rng, full, 5))
    r_cav = np.sqrt((x / (a - fat - wall)) ** 2 + ((y - y0) / (b - fat - wall)) ** 2)
    body, visceral, cavity = r_body < 1, r_visc < 1, r_cav < 1

    hu = np.full(full, -1000.0, dtype=np.float32)
    hu[body] = rng.uniform(-110, -90)  # subcutaneous fat
    hu[visceral] = rng.uniform(45, 55)  # muscle wall
    # bowel: heterogeneous soft tissue with mesenteric fat and a few gas pockets
    bowel = rng.uniform(15, 30) + 15 * _smooth_noise(rng, full, 12)
    bowel = np.where(_smooth_noise(rng, full, 12) > 0.55, np.float32(-90.0), bowel)
    bowel = np.where(_smooth_noise(rng, full, 10) > 1.9, np.float32(-850.0), bowel)
    hu = np.where(cavity, bowel, hu)

    # spine: vertebral body (cortex + cancellous bone, discs every ~30 mm), canal, lamina, paraspinal muscles
    rv = rng.uniform(13, 17)
    ys = y0 - (b - fat - wall) + rv + rng.uniform(8, 14)
    dv = np.sqrt(x**2 + (y - ys) ** 2)
    disc = np.mod(z - rng.uniform(0, 30), 30.0) < 5.0
    vert = dv < rv
    cortex = vert & (dv > rv - 3) & ~disc
    canal_y = ys - rv - 9
    dc = np.sqrt(x**2 + (y - canal_y) ** 2)
    for side in (-1, 1):
        mus = ((x - side * 28) / 17) ** 2 + ((y - canal_y) / 13) ** 2 < 1
        hu = np.where(mus & visceral, np.float32(50.0), hu)
    hu = np.where((dc < 13) & visceral, np.float32(rng.uniform(450, 600)), hu)  # lamina
    hu = np.where(dc < 7, np.float32(15.0), hu)  # canal
    hu = np.where(vert, np.where(disc, np.float32(85.0), np.float32(rng.uniform(220, 320))), hu)
    hu = np.where(cortex, np.float32(rng.uniform(650, 800)), hu)
    spine = np.broadcast_to((dv < rv + 3) | (dc < 13), full)

    # great vessels (contrast enhanced)
    aorta = np.broadcast_to((x + 0.7 * rv) ** 2 + (y - ys - rv - 10) ** 2 < rng.uniform(9, 12) ** 2, full)
    ivc = np.broadcast_to((x - 1.4 * rv) ** 2 + (y - ys - rv - 12) ** 2 < rng.uniform(8, 10) ** 2, full)
    hu = np.where(aorta, np.float32(rng.uniform(140, 190)), hu)
    hu = np.where(ivc, np.float32(rng.uniform(100, 130)), hu)

    masks: dict[str, np.ndarray] = {"body": body, "visceral": visceral, "cavity": cavity, "spine": spine}
    masks["vessels"] = aorta | ivc
    # landmarks along z: diaphragm dome (thorax only), organ heights
    if thorax:
        z_dia = zhi - rng.uniform(70, 85)
        z_liver = z_dia - rng.uniform(25, 40)
    else:
        z_dia = zhi + 40.0
        z_liver = rng.uniform(5, 25)
    z_kid = z_liver - rng.uniform(35, 50)

    # kidneys: cortex bright, hilum darker
    kidneys = np.zeros(full, bool)
    sinus = np.zeros(full, bool)
    for side in (-1, 1):
        kc = [side * (rv + rng.uniform(32, 40)), ys + rng.uniform(0, 10), z_kid + rng.uniform(-8, 8)]
        ks = [rng.uniform(20, 26), rng.uniform(15, 19), rng.uniform(40, 50)]
        q = _ellipsoid(coords, kc, ks, angle=side * rng.uniform(0.2, 0.5))
        k = (q < 1) & cavity
        hu = np.where(k, np.where(q < 0.35, np.float32(30.0), np.float32(rng.uniform(140, 180))), hu)
        kidneys |= k
        sinus |= k & (q < 0.35)
    masks["kidneys"] = kidneys
    masks["renal_sinus"] = sinus

    # spleen on the patient's left (-x)
    sc = [-(a - fat - wall) + rng.uniform(22, 30), ys + rng.uniform(20, 35), z_liver + rng.uniform(-5, 10)]
    spleen = _ellipsoid(coords, sc, [rng.uniform(18, 24), rng.uniform(30, 40), rng.uniform(35, 45)], 0.4) < 1
    spleen &= cavity
    hu = np.where(spleen, np.float32(rng.uniform(95, 120)), hu)
    masks["spleen"] = spleen

    # liver on the patient's right (+x): an irregular ellipsoid inside the abdominal cavity, painted by the caller
    lc = [(a - fat - wall) * rng.uniform(0.45, 0.6), y0 + rng.uniform(-4, 10), z_liver]
    ls = [rng.uniform(38, 48), rng.uniform(34, 44), rng.uniform(42, 55)]
    q_liver = _ellipsoid(coords, lc, ls, angle=rng.uniform(-0.3, 0.3), wobble=0.15 * _smooth_noise(rng, full, 5))
    liver = (q_liver < 1) & cavity & ~spine & ~masks["vessels"]
    if thorax:
        liver &= z < z_dia
    masks["liver"] = liver
    masks["liver_core"] = liver & (q_liver < 0.45)

    if thorax:
        # lungs above the diaphragm dome, heart between them, bladder at the bottom of the field of view
        lungs = np.zeros(full, bool)
        for side in (-1, 1):
            lcent = [side * (a - fat - wall) * 0.5, y0 + rng.uniform(-5, 5), z_dia + 90]
            lsemi = [(a - fat - wall) * rng.uniform(0.42, 0.5), (b - fat - wall) * rng.uniform(0.75, 0.9), 95]
            lungs |= (_ellipsoid(coords, lcent, lsemi, wobble=0.05 * _smooth_noise(rng, full, 4)) < 1) & cavity
        lungs &= ~spine
        hu = np.where(lungs, np.float32(rng.uniform(-870, -820)) + 25 * _smooth_noise(rng, full, 6), hu)
        hc = [-rng.uniform(5, 15), y0 + rng.uniform(10, 20), z_dia + rng.uniform(30, 40)]
        heart = _ellipsoid(coords, hc, [rng.uniform(38, 46), rng.uniform(30, 36), rng.uniform(35, 42)], 0.5) < 1
        heart &= cavity & ~spine
        hu = np.where(heart, np.float32(rng.uniform(35, 50)), hu)
        bc = [rng.uniform(-5, 5), y0 + (b - fat - wall) * 0.35, zlo + rng.uniform(20, 30)]
        bladder = _ellipsoid(coords, bc, [rng.uniform(28, 35), rng.uniform(22, 28), rng.uniform(18, 25)]) < 1
        bladder &= cavity & ~spine
        hu = np.where(bladder, np.float32(rng.uniform(5, 15)), hu)
        masks.update(lungs=lungs & ~heart, heart=heart, bladder=bladder)
    return {"hu": hu, "coords": coords, "masks": masks}


# ====================================================================================================== tasks
def _abdomen(rng: np.random.Generator, spec: TaskSpec) -> dict[str, Any]:
    """An abdominal CT field of view at a per-case spacing within +-20% of the task's, liver painted (no noise).

    Returns the :func:`_torso` dictionary plus ``"spacing"``, ``"shape"`` and ``"liver_hu"``.
    """
    target = np.asarray(spec.spacing, dtype=float)
    inplane = rng.uniform(0.8, 1.2)
    spacing = target * np.array([inplane, inplane, rng.uniform(0.8, 1.2)])
    fov = np.array([192.0, 168.0, 168.0]) * rng.uniform(0.95, 1.05, size=3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    torso = _torso(rng, shape, spacing, thorax=False)
    liver_hu = rng.uniform(58, 72)
    liver = torso["masks"]["liver"]
    torso["hu"] = np.where(liver, np.float32(liver_hu) + 5 * _smooth_noise(rng, shape, 6), torso["hu"])
    torso.update(spacing=spacing, shape=shape, liver_hu=liver_hu)
    return torso


def _ct_image(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """``hu`` with correlated scanner noise, rounded and clipped to the 12-bit CT range."""
    noise = _correlated_noise(rng, hu.shape) * rng.uniform(10, 18)
    return np.clip(np.rint(hu + noise), -1024, 3071).astype(np.float32)


def _abdomen_ct_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One abdominal CT (HU) with liver (1) and tumours (2); returns ``(image, label, spacing)``."""
    torso = _abdomen(rng, spec)
    hu, coords, masks, shape, liver_hu = (torso[k] for k in ("hu", "coords", "masks", "shape", "liver_hu"))
    liver = masks["liver"]
    label = np.zeros(shape, dtype=np.uint8)
    label[liver] = 1
    # every case has 1-2 hypodense tumours, so held-out cases always score the tumour class
    for _ in range(int(rng.integers(1, 3))):
        c = _pick_voxel(rng, masks["liver_core"], coords)
        if c is None:
            break
        r = rng.uniform(10, 22)
        q = _ellipsoid(coords, c, r * rng.uniform(0.8, 1.2, size=3), wobble=0.1 * _smooth_noise(rng, shape, 4))
        tumour = (q < 1) & liver
        hu = np.where(tumour, np.float32(liver_hu - rng.uniform(60, 80)) + 4 * _smooth_noise(rng, shape, 8), hu)
        label[tumour] = 2
    return _ct_image(rng, hu), label, tuple(float(s) for s in torso["spacing"])


def _kidney_ct_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One nephrographic-phase abdominal CT (HU) with kidneys (1) and spleen (2) labelled, the liver visible but
    unlabelled, and 0-2 hypodense renal cysts (part of the kidney label); returns ``(image, label, spacing)``."""
    torso = _abdomen(rng, spec)
    hu, coords, masks, shape = (torso[k] for k in ("hu", "coords", "masks", "shape"))
    kidneys = masks["kidneys"]
    # a nephrographic-phase scan: the renal parenchyma enhances well above the spleen (140-180 HU in abdomen_ct)
    parenchyma = kidneys & ~masks["renal_sinus"]
    hu = np.where(parenchyma, np.float32(rng.uniform(170, 220)) + 8 * _smooth_noise(rng, shape, 6), hu)
    for _ in range(int(rng.integers(0, 3))):
        c = _pick_voxel(rng, kidneys, coords)
        if c is None:
            break
        cyst = (_ellipsoid(coords, c, rng.uniform(5, 10, size=3)) < 1) & kidneys
        hu = np.where(cyst, np.float32(rng.uniform(0, 15)), hu)
    label = np.zeros(shape, dtype=np.uint8)
    label[kidneys] = 1
    label[masks["spleen"] & ~kidneys] = 2
    return _ct_image(rng, hu), label, tuple(float(s) for s in torso["spacing"])


def _lesion_petct_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One CT + PET (SUV) torso, channel last, with 1-4 lesions (1); returns ``(image, label, spacing)``."""
    target = np.asarray(spec.spacing, dtype=float)
    inplane = rng.uniform(0.85, 1.15)
    spacing = target * np.array([inplane, inplane, rng.uniform(0.85, 1.15)])
    fov = np.array([240.0, 192.0, 216.0]) * rng.uniform(0.95, 1.05, size=3)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    torso = _torso(rng, shape, spacing, thorax=True)
    hu, coords, m = torso["hu"], torso["coords"], torso["masks"]
    hu = np.where(m["liver"], np.float32(rng.uniform(50, 65)), hu)

    # PET activity (SUV) per tissue
    suv = np.zeros(shape, dtype=np.float32)
    suv[m["body"]] = rng.uniform(0.3, 0.45)  # fat
    suv[m["visceral"]] = rng.uniform(0.7, 0.9)  # muscle
    suv = np.where(m["cavity"], np.float32(rng.uniform(0.8, 1.1)) * (1 + 0.1 * _smooth_noise(rng, shape, 6)), suv)
    organ_suv = {
        "spine": rng.uniform(1.3, 1.9),
        "vessels": rng.uniform(1.4, 1.9),
        "kidneys": rng.uniform(2.5, 4.0),
        "spleen": rng.uniform(1.6, 2.2),
        "liver": rng.uniform(1.9, 2.6),
        "lungs": rng.uniform(0.3, 0.5),
        "heart": rng.uniform(3.0, 8.0),
        "bladder": rng.uniform(6.0, 12.0),
    }
    for organ, value in organ_suv.items():
        suv[m[organ]] = value

    # 1-4 spherical-ish lesions inside the trunk, away from the hot heart and bladder
    label = np.zeros(shape, dtype=np.uint8)
    allowed = m["cavity"] & ~m["heart"] & ~m["bladder"] & ~m["spine"] & ~m["vessels"]
    x, y, _ = coords
    allowed &= np.sqrt((x / (x.max() * 0.75)) ** 2 + (y / (y.max() * 0.75)) ** 2) < 1
    for _ in range(int(rng.integers(1, 5))):
        c = _pick_voxel(rng, allowed & (label == 0), coords)
        if c is None:
            break
        r = rng.uniform(6, 14)
        q = _ellipsoid(coords, c, r * rng.uniform(0.85, 1.15, size=3), wobble=0.1 * _smooth_noise(rng, shape, 4))
        lesion = (q < 1) & m["body"]
        label[lesion] = 1
        suv[lesion] = rng.uniform(4.0, 15.0)
        hu = np.where(lesion, np.float32(rng.uniform(30, 50)), hu)

    # scanner resolution (FWHM 6-9 mm) and count noise (variance ~ activity)
    sigma_vox = rng.uniform(6.0, 9.0) / 2.355 / spacing
    pet = _gaussian_blur(suv, sigma_vox)
    pet = pet + _correlated_noise(rng, shape, 0.8) * np.sqrt(np.maximum(pet, 0)) * rng.uniform(0.12, 0.2)
    pet = np.maximum(pet, 0).astype(np.float32)
    ct = np.clip(np.rint(hu + _correlated_noise(rng, shape) * rng.uniform(15, 25)), -1024, 3071)
    image = np.stack([ct.astype(np.float32), pet], axis=-1)
    return image, label, tuple(float(s) for s in spacing)


def _fetal_us_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One 2D ultrasound sector image with the fetal head (1); returns ``(image, label, spacing)``."""
    shape = (128, 112)
    spacing = np.asarray(spec.spacing, dtype=float) * rng.uniform(0.85, 1.15)
    x, y = _world_grid(shape, spacing)
    depth = y - float(y.min())  # the probe sits at the y = 0 edge; depth in mm along +y
    apex = -rng.uniform(8, 15)
    half_angle = math.radians(rng.uniform(36, 42))
    radial = np.sqrt(x**2 + (depth - apex) ** 2)
    sector = (np.abs(np.arctan2(x, depth - apex)) < half_angle) & (radial < float(depth.max()) - apex - 2)
    margin = np.abs(np.arctan2(x, depth - apex)) < half_angle - 0.06
    for _ in range(100):  # draw a head that fits well inside the sector
        semi_a = rng.uniform(22, 38)
        semi_b = semi_a * rng.uniform(0.7, 0.86)
        center = [rng.uniform(-15, 15), rng.uniform(semi_a + 8, float(depth.max()) - semi_a - 8)]
        angle = rng.uniform(-math.pi, math.pi)
        q = _ellipsoid([x, depth], center, [semi_a, semi_b], angle)
        head = q < 1
        inside = np.zeros(shape, dtype=bool)
        inside[3:-3, 3:-3] = True
        if not (head & ~(margin & sector & inside)).any():
            break
    thick = rng.uniform(2.5, 4.0)
    q_in = _ellipsoid([x, depth], center, [semi_a - thick, semi_b - thick], angle)
    # amniotic fluid pocket around the head, maternal tissue elsewhere
    fluid_q = _ellipsoid(
        [x, depth],
        center,
        [semi_a * rng.uniform(1.35, 1.7), semi_b * rng.uniform(1.4, 1.8)],
        angle + rng.uniform(-0.4, 0.4),
        wobble=0.15 * _smooth_noise(rng, shape, 5),
    )
    echo = np.broadcast_to(0.5 + 0.12 * _smooth_noise(rng, shape, 9), shape).copy()
    echo[fluid_q < 1] = rng.uniform(0.04, 0.08)
    echo[head] = rng.uniform(0.18, 0.26) + 0.04 * _smooth_noise(rng, shape, 8)[head]
    # skull ring, brighter where the bone is perpendicular to the beam
    dx, dy = x - center[0], depth - center[1]
    u, v = _rot_xy(dx, dy, angle)
    nu, nv = u / semi_a**2, v / semi_b**2
    c, s = math.cos(angle), math.sin(angle)
    n_depth = (s * nu + c * nv) / np.maximum(np.sqrt(nu**2 + nv**2), 1e-6)
    ring = head & (q_in >= 1)
    echo[ring] = (rng.uniform(0.8, 1.0) * (0.45 + 0.55 * np.abs(n_depth)))[ring]
    # midline echo along the major axis
    midline = (np.abs(v) < 0.8) & (q_in < 0.85)
    echo[midline] = rng.uniform(0.45, 0.6)
    # attenuation, speckle (Rayleigh amplitude, anisotropic grain), log compression, sector mask
    echo = echo * np.exp(-rng.uniform(0.004, 0.01) * depth)
    speckle = rng.rayleigh(1.0 / math.sqrt(math.pi / 2), size=shape).astype(np.float32)
    amp = _gaussian_blur(echo * speckle, [0.9, 0.5])
    image = 255.0 * np.log1p(25.0 * amp) / math.log1p(25.0)
    image = np.where(sector, image, 0.0).astype(np.float32)
    return image, head.astype(np.uint8), tuple(float(s) for s in spacing)


def _chest_xr_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One 2D posteroanterior chest radiograph with lungs (1) and heart (2); returns ``(image, label, spacing)``.

    Axis 0 runs towards the patient's right, axis 1 from the feet to the head. The image is a projection: a map
    of attenuation line integrals (soft tissue, mediastinum, spine, heart, ribs, clavicles, air in the lungs,
    lung vessels, upper abdomen) turned into detector values by ``1 - exp(-A)``, with an exposure gradient,
    quantum noise and a little unsharpness.
    """
    spacing = np.asarray(spec.spacing, dtype=float) * rng.uniform(0.87, 1.15)
    fov = np.array([384.0, 384.0]) * rng.uniform(0.95, 1.05, size=2)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    x0, y0 = _world_grid(shape, spacing)
    s = rng.uniform(0.82, 1.05)  # patient size
    cx, cy = rng.uniform(-20, 20), rng.uniform(-25, 10)
    x, y = _rot_xy(x0 - cx, y0 - cy, rng.uniform(-0.08, 0.08))  # patient frame, centred on the mid-thorax

    half = 150.0 * s * rng.uniform(0.92, 1.05)  # half width of the chest wall
    body_w = (half + 22 * s) * (1 + 0.02 * _smooth_noise(rng, shape, 4))
    neck = (y > 150 * s) & (np.abs(x) < rng.uniform(42, 52) * s)
    trunk = (np.abs(x) < body_w) & (y < 175 * s - 0.25 * np.abs(x) ** 1.2 / s**0.2)
    t_body = np.sqrt(np.clip(1 - (x / body_w) ** 2, 0, 1)) * (trunk | neck)
    att = 0.55 * t_body

    # diaphragm domes (the right one a little higher) and the mediastinum between the lungs
    dome_y = -rng.uniform(100, 115) * s
    dome = np.where(x > 0, dome_y + rng.uniform(8, 18) * s, dome_y) + 38 * s * np.clip(
        1 - ((np.abs(x) - 0.48 * half) / (0.55 * half)) ** 2, 0, 1
    )
    med = (rng.uniform(22, 30) + 0.12 * np.clip(60 * s - y, 0, None)) * s
    lungs = np.zeros(shape, dtype=bool)
    lung_t = np.zeros(shape, dtype=np.float32)
    for side in (-1, 1):
        lc = [side * 0.5 * half * rng.uniform(0.95, 1.05), rng.uniform(-5, 10) * s]
        ls = [0.47 * half * rng.uniform(0.95, 1.08), rng.uniform(135, 150) * s]
        q = _ellipsoid([x, y], lc, ls, side * rng.uniform(-0.08, 0.02), wobble=0.04 * _smooth_noise(rng, shape, 5))
        lung = (q < 1) & (y > dome) & (np.abs(x) > med) & (side * x > 0)
        lungs |= lung
        lung_t = np.maximum(lung_t, np.sqrt(np.clip(1 - q, 0, 1)) * lung)

    # heart: projected ellipsoid, mostly on the patient's left (-x), sitting on the diaphragm in front of the
    # lower medial lungs (which it hides)
    hs = [rng.uniform(66, 80) * s, rng.uniform(54, 64) * s]
    hc = [-rng.uniform(18, 32) * s, dome_y + rng.uniform(1.0, 1.2) * hs[1]]
    q_heart = _ellipsoid([x, y], hc, hs, rng.uniform(0.25, 0.5), wobble=0.03 * _smooth_noise(rng, shape, 5))
    heart = (q_heart < 1) & (y > dome - 6 * s)
    heart_t = _gaussian_blur(np.sqrt(np.clip(1 - q_heart, 0, 1)) * heart, [1.0, 1.0])
    att -= 0.45 * _gaussian_blur(lung_t, [1.0, 1.0]) * (1 - 0.8 * np.clip(2 * heart_t, 0, 1))
    att += 0.35 * heart_t
    mediastinum = _gaussian_blur((np.abs(x) < med) & (y > dome_y), [2.0, 2.0])
    att += 0.35 * mediastinum * (trunk | neck)
    spine_w = rng.uniform(16, 20) * s
    discs = 0.85 + 0.15 * (np.mod(y - rng.uniform(0, 24), 24.0 * s) > 5 * s)
    att += 0.3 * np.sqrt(np.clip(1 - (x / spine_w) ** 2, 0, 1)) * discs * (trunk | neck)
    # upper abdomen below the domes (the liver on the patient's right is denser)
    abdomen = _gaussian_blur(((y < dome) & trunk).astype(np.float32), [1.5, 1.5])
    att += abdomen * (0.28 + 0.08 * (x > 0)) * t_body
    # lung vessels: fine structure fanning out from the hila
    hilum = np.exp(-np.sqrt((np.abs(x) - med - 20 * s) ** 2 + (y - 10 * s) ** 2) / (70 * s))
    vessels = np.clip(_smooth_noise(rng, shape, [s0 // 5 for s0 in shape]), 0, None)
    att += lungs * (0.05 + 0.1 * hilum) * vessels

    # ribs: curved bands with a brighter cortex, and the clavicles
    ribs = np.zeros(shape, dtype=np.float32)
    ax = np.abs(x)
    u = np.clip((ax - 15 * s) / half, 0, 1.1)
    for k in range(11):
        yk = 150 * s - k * rng.uniform(24, 27) * s + rng.uniform(-3, 3)
        centre = yk + 20 * s * np.sin(np.pi * 0.9 * u) - 45 * s * u**2
        w = rng.uniform(4.0, 5.5) * s
        d = np.abs(y - centre)
        band = (d < w) & (ax > 15 * s) & (ax < half * 1.02)
        ribs = np.maximum(ribs, band * (0.06 + 0.07 * (d > w - 2.0 * s)))
    for side in (-1, 1):
        yc = 160 * s + rng.uniform(-8, 8) * s - 0.18 * ax
        clav = (np.abs(y - yc) < rng.uniform(5, 7) * s) & (ax > 20 * s) & (ax < 0.85 * half) & (side * x > 0)
        ribs = np.maximum(ribs, clav * 0.22)
    att += _gaussian_blur(ribs, [0.6, 0.6]) * (trunk | neck)

    # detector: exposure gradient (heel effect), contrast, unsharpness, quantum noise, 12-bit values
    att = np.clip(att, 0, None) * rng.uniform(1.6, 2.4) * (1 + 0.06 * _smooth_noise(rng, shape, 3))
    signal = (1 - np.exp(-att)) ** rng.uniform(0.8, 1.25)
    signal = _gaussian_blur(signal, [0.7, 0.7])
    signal = signal + _correlated_noise(rng, shape, 0.6) * (0.01 + 0.02 * np.sqrt(np.clip(signal, 0, 1)))
    image = np.clip(4095.0 * (rng.uniform(0.03, 0.08) + 0.9 * signal), 0, 4095).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[lungs & ~heart] = 1
    label[heart] = 2
    return image, label, tuple(float(v) for v in spacing)


def _draw_strokes(rng: np.random.Generator, shape: Sequence[int], n: int, length: tuple[float, float]) -> np.ndarray:
    """``n`` thin curved strokes (quadratic Bezier curves of ``length`` pixels, about one pixel wide), as an
    alpha map in [0, 1] of ``shape``."""
    canvas = np.zeros(tuple(shape), dtype=np.float32)
    for _ in range(n):
        p0 = rng.uniform(0, 1, size=2) * np.asarray(shape)
        theta = rng.uniform(0, 2 * math.pi)
        ln = rng.uniform(*length)
        p2 = p0 + ln * np.array([math.cos(theta), math.sin(theta)])
        p1 = (p0 + p2) / 2 + rng.uniform(-0.25, 0.25) * ln * np.array([-math.sin(theta), math.cos(theta)])
        t = np.linspace(0, 1, max(2, int(ln * 3)))[:, None]
        pts = np.rint((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(int)
        keep = (pts >= 0).all(1) & (pts < np.asarray(shape)).all(1)
        canvas[pts[keep, 0], pts[keep, 1]] = rng.uniform(0.7, 1.0)
    return np.clip(_gaussian_blur(canvas, [0.5, 0.5]) * 2.5, 0, 1)


def _skin_lesion_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One 2D RGB dermoscopy image (channel last, values 0-255) with a pigmented lesion (1); returns
    ``(image, label, spacing)``.

    Skin of a random tone with texture and redness, a lesion with an irregular, partly fuzzy border, colour
    variegation, a pigment network and dark globules, dark hairs across the field, vignetting and, in some
    cases, the black corners of the dermoscope's round aperture.
    """
    spacing = np.asarray(spec.spacing, dtype=float) * rng.uniform(0.87, 1.15)
    fov = np.array([19.2, 19.2]) * rng.uniform(0.95, 1.05, size=2)
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    x, y = _world_grid(shape, spacing)
    half = float(min(fov)) / 2

    # skin: tone, low-frequency colour variation, redness, fine texture
    tone = rng.uniform(0.75, 1.05)
    skin = np.stack(
        [
            np.full(shape, c * tone, dtype=np.float32) + 0.03 * _smooth_noise(rng, shape, 4)
            for c in (rng.uniform(0.82, 0.92), rng.uniform(0.6, 0.7), rng.uniform(0.45, 0.56))
        ]
    )
    red = np.clip(_smooth_noise(rng, shape, 5), 0, None) * rng.uniform(0.0, 0.08)
    skin[0] += red
    skin[1] -= 0.5 * red
    skin = skin * (1 + 0.03 * _correlated_noise(rng, shape, 1.0))

    # lesion: polar radius with random harmonics and a smooth wobble, fuzzy border of random width
    centre = rng.uniform(-0.15, 0.15, size=2) * half
    radius = rng.uniform(0.3, 0.55) * half
    dx, dy = x - centre[0], y - centre[1]
    rho, phi = np.sqrt(dx**2 + dy**2), np.arctan2(dy, dx)
    shape_r = 1.0 + sum(
        rng.uniform(0, 0.14) / math.sqrt(k) * np.cos(k * phi + rng.uniform(0, 2 * math.pi)) for k in range(2, 7)
    )
    shape_r = shape_r * rng.uniform(0.75, 1.0, size=2)[(np.cos(phi) > 0).astype(int)] ** 0.5
    d = rho / (radius * shape_r) + 0.06 * _smooth_noise(rng, shape, 8)
    soft = rng.uniform(0.03, 0.12)
    alpha = 1.0 / (1.0 + np.exp(-(1.0 - d) / soft))
    lesion = d < 1

    # pigment: light brown to dark brown / black with a bluish area, darker towards the centre
    palette = np.array(
        [[0.62, 0.42, 0.30], [0.38, 0.22, 0.14], [0.16, 0.10, 0.08], [0.40, 0.44, 0.55]], dtype=np.float32
    ) * rng.uniform(0.85, 1.1)
    w = np.stack(
        [
            1.0 + 0.8 * _smooth_noise(rng, shape, 4),
            0.6 + 1.2 * np.clip(1 - d, 0, 1) + 0.6 * _smooth_noise(rng, shape, 4),
            rng.uniform(-0.6, 0.8) + np.clip(0.8 - d, 0, 1) + 0.8 * _smooth_noise(rng, shape, 5),
            rng.uniform(-1.5, 0.3) + 0.8 * _smooth_noise(rng, shape, 3),
        ]
    )
    w = np.exp(2.0 * w)
    colour = np.einsum("kxy,kc->cxy", w / w.sum(0, keepdims=True), palette)
    period = rng.uniform(0.35, 0.6)  # pigment network mesh (mm)
    jitter = 0.25 * period * _smooth_noise(rng, shape, 10)
    mesh = np.abs(np.sin(math.pi * (x + jitter) / period)) * np.abs(np.sin(math.pi * (y - jitter) / period))
    colour = colour * (1 - rng.uniform(0.1, 0.3) * (1 - mesh) * np.clip(1.2 - d, 0, 1))
    globules = _gaussian_blur((rng.uniform(size=shape) < rng.uniform(0.002, 0.01)).astype(np.float32), [0.8, 0.8])
    colour = colour * (1 - np.clip(globules * 6, 0, 0.7) * lesion)
    contrast = rng.uniform(0.45, 0.95)
    a = contrast * alpha
    image = skin * (1 - a) + colour * a

    # hairs, vignetting, dermoscope aperture, sensor noise
    hair = _draw_strokes(rng, shape, int(rng.integers(0, 14)), (0.3 * shape[0], 1.2 * shape[0]))
    image = image * (1 - 0.85 * hair) + np.array([0.08, 0.06, 0.05], dtype=np.float32)[:, None, None] * 0.85 * hair
    r = np.sqrt(x**2 + y**2) / half
    image = image * (1 - rng.uniform(0.1, 0.35) * r**2)
    if rng.uniform() < 0.4:
        image = np.where(r < rng.uniform(1.05, 1.3), image, np.float32(0.03))
    image = image + 0.012 * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(255.0 * image, 0, 255).astype(np.float32)
    return np.moveaxis(image, 0, -1), lesion.astype(np.uint8), tuple(float(v) for v in spacing)


def _find_nilearn() -> Path | None:
    """Folder of the installed nilearn package, without importing it (``None`` when not installed)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _load_mni152() -> dict[str, Any]:
    """T1, GM and WM maps (1 mm, scaled to [0, 1]) of the MNI152 2009 template shipped inside nilearn.

    The files are read from ``nilearn/datasets/data`` directly (importing ``nilearn.datasets`` takes seconds);
    when they are not found there, the ``nilearn.datasets.load_mni152_*`` loaders are used.

    Raises:
        ImportError: when nilearn is not installed.
    """
    root = _find_nilearn()
    if root is None:
        raise ImportError(
            "the 'brain_mr' demo task is built from the MNI152 template shipped with nilearn, which is not "
            "installed: run `pip install nilearn` (or `pip install uniseg-components[demo]`), or leave the task "
            "out with tasks=[...]."
        )
    files = {k: root / "datasets" / "data" / f for k, f in _MNI_FILES.items()}
    if all(f.is_file() for f in files.values()):
        imgs = {k: nib.load(str(f)) for k, f in files.items()}
    else:  # other nilearn versions: the public loaders (same files, same [0, 1] scaling)
        from nilearn import datasets as nds

        imgs = {
            "t1": nds.load_mni152_template(resolution=1),
            "gm": nds.load_mni152_gm_template(resolution=1),
            "wm": nds.load_mni152_wm_template(resolution=1),
        }
    out: dict[str, Any] = {}
    for k, img in imgs.items():
        a = np.asarray(img.dataobj, dtype=np.float32)
        out[k] = a / max(float(a.max()), 1e-6)
    out["affine"] = np.asarray(imgs["t1"].affine, dtype=float)
    return out


def _prepare_brain(mni: dict[str, Any]) -> dict[str, Any]:
    """Tissue probabilities of the template cropped to the brain and average-pooled to 2 mm."""
    t1, gm, wm = mni["t1"], mni["gm"], mni["wm"]
    mask = (t1 > 0.2).astype(np.float32)  # nilearn's load_mni152_brain_mask threshold
    chans = np.stack([t1, 1 - mask, np.clip(mask - gm - wm, 0, 1), gm * mask, wm * mask])
    nz = np.argwhere(mask > 0)
    lo = np.maximum(nz.min(0) - 6, 0)
    hi = np.minimum(nz.max(0) + 7, mask.shape)
    hi = lo + (hi - lo) // 2 * 2  # even sizes for the 2x pooling
    crop = chans[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pooled = F.avg_pool3d(torch.from_numpy(np.ascontiguousarray(crop))[None], 2)[0]
    aff = mni["affine"]
    vox = np.abs(np.diag(aff)[:3])
    # world (mm) of pooled voxel 0 and the pooled voxel size; the template affine is diagonal and RAS
    origin = aff[:3, 3] + (lo + 0.5) * vox
    center = aff[:3, 3] + (nz.min(0) + nz.max(0)) / 2.0 * vox
    return {"data": pooled, "origin": origin, "step": 2 * vox, "center": center}


def _rotation(angles: Sequence[float]) -> np.ndarray:
    rx, ry, rz = angles
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _brain_mr_case(rng: np.random.Generator, spec: TaskSpec, index: int, ctx: dict) -> tuple:
    """One deformed MNI152 T1 with CSF (1), GM (2), WM (3); returns ``(image, label, spacing)``."""
    if "brain" not in ctx:
        ctx["brain"] = _prepare_brain(_load_mni152())
    tpl = ctx["brain"]
    spacing = np.asarray(spec.spacing, dtype=float) * rng.uniform(0.9, 1.1, size=3)
    fov = np.array([192.0, 228.0, 192.0])
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    grid = np.stack(np.meshgrid(*_world_grid(shape, spacing), indexing="ij"), axis=-1).astype(np.float64)
    # random affine (rotation +-10 deg, scaling 0.9-1.1, shift +-6 mm) and a smooth elastic field (2-4 mm)
    m = _rotation(rng.uniform(-0.17, 0.17, size=3)) @ np.diag(rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3))
    src = (grid - rng.uniform(-6, 6, size=3)) @ np.linalg.inv(m).T + tpl["center"]
    disp = np.stack([_smooth_noise(rng, shape, 5) for _ in range(3)], axis=-1)
    src = src + disp / max(float(np.abs(disp).max()), 1e-6) * rng.uniform(2, 4)
    idx = (src - tpl["origin"]) / tpl["step"]
    size = np.asarray(tpl["data"].shape[1:], dtype=float)
    norm = 2.0 * idx / (size - 1) - 1.0
    g = torch.from_numpy(norm[..., ::-1].copy()).float()[None]  # grid_sample wants (z, y, x) order
    out = F.grid_sample(tpl["data"][None], g, mode="bilinear", padding_mode="border", align_corners=True)[0]
    out = out.numpy()
    label = out[1:].argmax(0).astype(np.uint8)
    # intensity: gamma, bias field, scaling, Rician noise
    t1 = np.clip(out[0], 0, None) ** rng.uniform(0.8, 1.25)
    t1 = t1 * np.exp(rng.uniform(0.08, 0.2) * _smooth_noise(rng, shape, 3))
    scale = rng.uniform(400, 1000)
    sigma = rng.uniform(0.01, 0.03)
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    image = (scale * np.sqrt((t1 + n1) ** 2 + n2**2)).astype(np.float32)
    return image, label, tuple(float(s) for s in spacing)


_GENERATORS: dict[str, tuple[int, Callable[..., tuple]]] = {
    # task name -> (salt of the random stream, case generator)
    "abdomen_ct": (1, _abdomen_ct_case),
    "brain_mr": (2, _brain_mr_case),
    "lesion_petct": (3, _lesion_petct_case),
    "fetal_us": (4, _fetal_us_case),
    "chest_xr": (5, _chest_xr_case),
    "skin_lesion": (6, _skin_lesion_case),
    "kidney_ct": (7, _kidney_ct_case),
}


# ====================================================================================================== writing
def _write_task(folder: Path, spec: TaskSpec, n: int, seed: int, ctx: dict) -> None:
    salt, gen = _GENERATORS[spec.name]
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), salt, i])
        image, label, spacing = gen(rng, spec, i, ctx)
        if spec.dims == 2 and spec.num_channels > 1:  # (X, Y, C) -> (X, Y, 1, C), nnU-Net's 2D layout
            image = image[:, :, None, :]
        case = f"{spec.name}_{i:03d}.nii.gz"
        _write_nifti(folder / "imagesTr" / case, np.ascontiguousarray(image, dtype=np.float32), spacing)
        _write_nifti(folder / "labelsTr" / case, np.ascontiguousarray(label, dtype=np.uint8), spacing)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    if spec.num_channels > 1:
        size = "4D"
    else:
        size = f"{spec.dims}D"
    meta = {
        "name": spec.dataset or spec.name,
        "description": f"{spec.description} (uniseg_components synthetic demo, seed {seed})".lstrip(),
        "reference": "uniseg_components.demo",
        "licence": _MNI_NOTICE if spec.name == "brain_mr" else "CC0-1.0 (synthetic)",
        "release": "1.0",
        "tensorImageSize": size,
        "modality": {str(i): m for i, m in enumerate(spec.modalities)},
        "labels": {str(i): c for i, c in enumerate(spec.labels)},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")


def demo_collection_exists(out_dir: str | os.PathLike, names: Sequence[str] | None = None) -> bool:
    """Whether ``out_dir`` holds a complete demo collection.

    Args:
        out_dir: the collection folder.
        names: task names that must be in the collection, default ``None`` (any).

    Returns:
        True when ``<out_dir>/tasks.json`` loads, lists ``names`` and every listed task's dataset folder has a
        ``dataset.json``.
    """
    out_dir = Path(out_dir)
    try:
        catalog = TaskCatalog.load(out_dir / DEMO_TASKS_FILE)
    except (OSError, ValueError):
        return False
    if names is not None and not set(names) <= set(catalog.names):
        return False
    return all((out_dir / (t.dataset or t.name) / "dataset.json").is_file() for t in catalog)


def _case_counts(catalog: TaskCatalog, num_cases: Mapping[str, int] | int | None) -> dict[str, int]:
    counts = {t.name: DEFAULT_NUM_CASES.get(t.name, 10) for t in catalog}
    if num_cases is None:
        pass
    elif isinstance(num_cases, Mapping):
        unknown = sorted(set(num_cases) - set(counts))
        if unknown:
            raise ValueError(f"num_cases names unknown or unselected task(s) {unknown}; tasks: {sorted(counts)}.")
        counts.update({k: int(v) for k, v in num_cases.items()})
    else:
        counts = {k: int(num_cases) for k in counts}
    bad = {k: v for k, v in counts.items() if v < 1}
    if bad:
        raise ValueError(f"num_cases must be >= 1 per task, got {bad}.")
    return counts


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished collection ``tmp`` to ``out_dir``: one rename when ``out_dir`` is absent or empty,
    otherwise folder by folder (replacing same-named ones) with ``tasks.json`` last."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"demo collection target {str(out_dir)!r} exists and is not a folder.")
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
    try:
        for child in sorted(tmp.iterdir()):
            if child.name == DEMO_TASKS_FILE:
                continue
            target = out_dir / child.name
            if target.exists() or target.is_symlink():
                os.replace(target, trash / child.name)
            os.replace(child, target)
        os.replace(tmp / DEMO_TASKS_FILE, out_dir / DEMO_TASKS_FILE)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary folders (``.<name>.tmp-<pid>-*``, ``.<name>.old-*``) that a killed earlier run of
    :func:`write_demo_collection` for ``out_dir`` left beside it; those of a process still running are kept."""
    for path in out_dir.parent.glob(f".{out_dir.name}.*"):
        parts = path.name[len(out_dir.name) + 2 :].split("-")
        if not path.is_dir() or parts[0] not in ("tmp", "old"):
            continue
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)  # the writer is still running
                continue
            except ProcessLookupError:
                pass
            except PermissionError:  # another user's running process
                continue
        if pid == os.getpid():
            continue
        logger.info("removing %s, left by an interrupted demo-data run", path)
        shutil.rmtree(path, ignore_errors=True)


def write_demo_collection(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_cases: Mapping[str, int] | int | None = None,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
    catalog: TaskCatalog | str | os.PathLike = DEMO_CATALOG,
) -> Path:
    """Write the synthetic demo collection (MSD layout plus ``tasks.json``) under ``out_dir``.

    The collection is built in a temporary sibling folder and moved into place at the end, so an interrupted
    run leaves no half-written collection. Prints nothing; progress goes to the module logger.

    Args:
        out_dir: collection folder; created (with its parents) when missing. Other files already in it are
            kept; dataset folders of the written tasks and ``tasks.json`` are replaced.
        seed: random seed, default 0. The same seed gives byte-identical files; case ``i`` of a task does not
            depend on ``num_cases``.
        num_cases: cases per task: an int for every task, a dict ``{task name: count}`` overriding some tasks,
            or ``None`` (default) for :data:`DEFAULT_NUM_CASES` (10 per 3D task, 16 per 2D task).
        tasks: names of the demo tasks to write, default ``None`` (every task of ``catalog``). ``tasks.json``
            then holds the catalog restricted to these tasks, ids renumbered from 0.
        overwrite: regenerate even when ``out_dir`` already holds a collection with the requested tasks,
            default False. Without it such a collection is returned unchanged (seed and case counts are not
            compared).
        catalog: the catalog whose tasks are written (object, JSON file or built-in name), default ``"demo"``
            (the six tasks above); ``"demo_new_tasks"`` holds ``kidney_ct``, kept out of the bundles' default
            training data as the new dataset of the incremental-learning demo. Every task must be a demo task
            (its name selects the generator; spacing, labels and dataset folder come from the catalog).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: when ``brain_mr`` is requested and nilearn (the ``demo`` extra) is not installed.
        ValueError: for unknown task names, tasks without a demo generator or case counts below 1.
    """
    out_dir = Path(out_dir)
    catalog = TaskCatalog.resolve(catalog)
    if isinstance(tasks, str):
        tasks = [tasks]
    if tasks is not None:
        catalog = catalog.select(names=list(dict.fromkeys(tasks)))
    missing = [t.name for t in catalog if t.name not in _GENERATORS]
    if missing:
        raise ValueError(
            f"catalog {catalog.name!r}: no demo generator for task(s) {missing}; demo tasks: {sorted(_GENERATORS)}."
        )
    counts = _case_counts(catalog, num_cases)
    if not overwrite and demo_collection_exists(out_dir, catalog.names):
        logger.info("demo collection already in %s; pass overwrite=True to regenerate.", out_dir)
        return out_dir
    if "brain_mr" in catalog.names and _find_nilearn() is None:
        _load_mni152()  # raises the ImportError before any work

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    ctx: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for spec in catalog:
                t0 = time.perf_counter()
                _write_task(tmp / (spec.dataset or spec.name), spec, counts[spec.name], seed, ctx)
                logger.info("wrote %d %s cases in %.1f s", counts[spec.name], spec.name, time.perf_counter() - t0)
        catalog.save(tmp / DEMO_TASKS_FILE)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Serve and train release zips in a real MONAI Label server on loopback (driven by ``check_monailabel.sh``).

Per zip: the bundle is unzipped into ``model/<name>/`` of MONAI Label's own ``monaibundle`` sample app, a studies
folder gets three demo cases of the bundle's served task (images, and their labels in ``labels/final``), and
``monailabel start_server`` runs on 127.0.0.1 with ``zoo_source github`` (no model-zoo lookup: the local folder is
used), ``sam2 false`` (no SAM2 download) and ``preload false``. Then:

1. ``GET /info/``: the model is listed with the labels of ``metadata.json``'s ``channel_def``;
2. ``POST /infer/<name>``: the label map is a NIfTI file (not MONAI Label's NRRD fallback) with the image's shape
   and affine and only the bundle's label values, and its Dice against the case's label is reported;
3. ``POST /train/<name>`` for one epoch (``run_sync``): a new ``models/model.pt`` is written;
4. ``POST /infer/<name>`` again, served by the trained weights;

and the server log must not hold MONAI Label's "Checkpoint keys don't match" warning (it loads weights with
``strict=False`` and would serve partly random weights) nor any traceback. Prints one line per step with its time,
and a JSON summary per bundle; exits 1 at the first failure, with the end of the server log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from uniseg_components.demo import write_demo_collection
from uniseg_components.tasks import TaskCatalog


class CheckFailed(RuntimeError):
    pass


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 1800) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _served(bundle: Path) -> tuple[str, TaskCatalog]:
    """The bundle's served task and its catalog (``configs/tasks.json`` of a release with weights, else built-in)."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    task = config["task"]
    shipped = bundle / "configs" / "tasks.json"
    catalog = TaskCatalog.resolve(shipped if shipped.is_file() else "demo")
    return task, catalog


def _studies(folder: Path, task: str, catalog: TaskCatalog) -> list[str]:
    """Three demo cases of ``task`` as a MONAI Label studies folder; returns the image ids."""
    demo = write_demo_collection(folder / "demo", tasks=[task], num_cases=3, catalog="demo")
    ds = demo / catalog[task].dataset
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    ids = []
    for image in sorted((ds / "imagesTr").glob("*.nii.gz")):
        shutil.copy(image, folder / image.name)
        shutil.copy(ds / "labelsTr" / image.name, folder / "labels" / "final" / image.name)
        ids.append(image.name[: -len(".nii.gz")])
    shutil.rmtree(folder / "demo")
    return ids


def _check_prediction(data: bytes, image: Path, label: Path, values: set[int], out: Path) -> dict[str, Any]:
    if data[:2] != b"\x1f\x8b":
        raise CheckFailed(
            f"the prediction is not a .nii.gz file (starts with {data[:16]!r}; NRRD is MONAI Label's "
            "fallback for a multi-channel output)"
        )
    out.write_bytes(data)
    pred, img = nib.load(str(out)), nib.load(str(image))
    arr = np.asarray(pred.dataobj)
    if arr.shape[:3] != img.shape[:3]:
        raise CheckFailed(f"prediction shape {arr.shape} is not the image's {img.shape}")
    if not np.allclose(pred.affine, img.affine, atol=1e-3):
        raise CheckFailed(f"prediction affine differs from the image's:\n{pred.affine}\n{img.affine}")
    found = {int(v) for v in np.unique(arr)}
    if not found <= values | {0}:
        raise CheckFailed(f"prediction holds label values {sorted(found)}, the bundle's are {sorted(values)}")
    truth = np.asarray(nib.load(str(label)).dataobj)
    dice = {
        v: round(float(2 * ((arr == v) & (truth == v)).sum() / max(1, (arr == v).sum() + (truth == v).sum())), 3)
        for v in sorted(values)
    }
    return {"shape": list(arr.shape), "values": sorted(found), "dice": dice}


def check_zip(zip_path: Path, monailabel: Path, work: Path, port: int) -> dict[str, Any]:
    with zipfile.ZipFile(zip_path) as zf:
        name = zf.namelist()[0].split("/")[0]
        app = work / "app"
        shutil.copytree(monailabel.parent.parent / "monailabel" / "sample-apps" / "monaibundle", app)
        zf.extractall(app / "model")
    bundle = app / "model" / name
    task, catalog = _served(bundle)
    ids = _studies(work / "studies", task, catalog)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    labels = {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
    log = work / "server.log"
    cmd = [
        str(monailabel),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(work / "studies"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for k, v in (("models", name), ("zoo_source", "github"), ("sam2", "false"), ("preload", "false")):
        cmd += ["--conf", k, v]
    env = {**os.environ, "PATH": f"{monailabel.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    report: dict[str, Any] = {"bundle": name, "task": task}
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise CheckFailed(f"the server exited at start-up (status {server.returncode})")
            try:
                status, body = _request(f"{base}/info/", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > 300:
                raise CheckFailed("the server did not answer /info/ within 300 s")
            time.sleep(1)
        report["start_s"] = round(time.time() - t0, 1)
        info = json.loads(body)
        model = info.get("models", {}).get(name)
        if model is None:
            raise CheckFailed(f"/info/ does not list {name} (models: {list(info.get('models', {}))})")
        if model.get("labels") != labels:
            raise CheckFailed(f"/info/ labels {model.get('labels')} != metadata channel_def {labels}")
        if name not in info.get("trainers", {}):
            raise CheckFailed(f"/info/ lists no trainer for {name}")
        print(f"  /info/: {name}, labels {labels} ({report['start_s']} s to start)", flush=True)

        image = work / "studies" / f"{ids[0]}.nii.gz"
        truth = work / "studies" / "labels" / "final" / image.name
        for step in ("infer", "train", "infer_trained"):
            t = time.time()
            if step == "train":
                before = (bundle / "models" / "model.pt").stat().st_mtime_ns
                status, body = _request(
                    f"{base}/train/{name}?run_sync=true",
                    "POST",
                    {"max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "device": "cpu"},
                )
                if status != 200:
                    raise CheckFailed(f"/train/ answered {status}: {body[-500:]!r}")
                if (bundle / "models" / "model.pt").stat().st_mtime_ns == before:
                    raise CheckFailed("training wrote no new models/model.pt")
                report["train_s"] = round(time.time() - t, 1)
                print(f"  /train/ 1 epoch: new models/model.pt ({report['train_s']} s)", flush=True)
                continue
            status, body = _request(f"{base}/infer/{name}?image={ids[0]}&output=image", "POST", {})
            if status != 200:
                raise CheckFailed(f"/infer/ answered {status}: {body[-500:]!r}")
            result = _check_prediction(body, image, truth, set(labels.values()), work / f"{step}.nii.gz")
            report[step] = {**result, "seconds": round(time.time() - t, 1)}
            print(f"  /infer/ ({step}): {result} ({report[step]['seconds']} s)", flush=True)
        text = log.read_text(errors="replace")
        for bad in ("Checkpoint keys don't match", "Traceback (most recent call last)"):
            if bad in text:
                raise CheckFailed(f"the server log holds {bad!r}")
        return report
    except CheckFailed:
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and every process it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zips", nargs="+", type=Path)
    parser.add_argument("--monailabel", type=Path, required=True, help="the monailabel command of its venv")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (kept), default a temporary one per bundle, removed after a pass",
    )
    args = parser.parse_args()
    reports = []
    for z in args.zips:
        work = Path(tempfile.mkdtemp(prefix="monailabel-check-", dir=args.work))
        print(f"== {z.name} (work folder {work})", flush=True)
        t = time.time()
        try:
            report = check_zip(z.resolve(), args.monailabel.resolve(), work, args.port)
        except CheckFailed as e:
            print(f"FAILED {z.name}: {e}", file=sys.stderr)
            sys.exit(1)
        report["total_s"] = round(time.time() - t, 1)
        print(json.dumps(report), flush=True)
        reports.append(report)
        if args.work is None:  # our own temporary folder: removed after a pass, kept (and named above) after a failure
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(reports)} bundle(s) pass in a real MONAI Label server")


if __name__ == "__main__":
    main()

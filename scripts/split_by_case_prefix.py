# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Split a raw dataset folder that holds several tasks into one folder per task, by the case names' prefix.

UniSeg's authors convert MOTS (liver, kidney, hepatic vessel, pancreas, colon, lung and spleen, with different label
meanings) into one nnU-Net v1 raw folder (``Task091_MOTS``) whose cases are told apart by the first four characters
of their names (``live_0001``, ``kidn_0001``...). The project's catalogs have one folder per task instead (the
built-in ``uniseg_11tasks`` names them ``MOTS_liver``, ``MOTS_kidney``...). This script writes those folders:
symbolic links to the images and labels (nothing is copied) and a ``dataset.json`` listing the task's cases, in the
source's layout (MSD v1 / nnU-Net v1: ``training`` list; nnU-Net v2: ``channel_names`` and the files), which
``python -m uniseg_components prepare`` then reads with the authors' split file (``--split``). Case names are kept,
so the split's case ids match.

Usage::

    python scripts/split_by_case_prefix.py RAW/Task091_MOTS --out RAW   # UniSeg's MOTS prefixes (the default)
    python scripts/split_by_case_prefix.py SRC --out DIR --map "abcd=TaskA,efgh=TaskB"

Exits 1, writing nothing, when a case matches no prefix (unless ``--ignore_unmatched``), a case's image or label
file is missing, a target folder already exists with other content, or a prefix matches no case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

#: UniSeg's MOTS case prefixes (the first four characters of the case name) -> the ``uniseg_11tasks`` dataset folders
UNISEG_MOTS = {
    "live": "MOTS_liver",
    "kidn": "MOTS_kidney",
    "hepa": "MOTS_hepatic_vessel",
    "panc": "MOTS_pancreas",
    "colo": "MOTS_colon",
    "lung": "MOTS_lung",
    "sple": "MOTS_spleen",
}


def parse_map(text: str) -> dict[str, str]:
    """``"abcd=TaskA,efgh=TaskB"`` -> ``{"abcd": "TaskA", "efgh": "TaskB"}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        prefix, sep, folder = part.partition("=")
        if not sep or not prefix or not folder:
            raise ValueError(f"--map entries must be PREFIX=FOLDER, got {part!r}.")
        out[prefix] = folder
    return out


def _case_of(entry: dict) -> str:
    """The case name of a ``training`` entry: its label file's name without ``.nii.gz`` / ``.nii``."""
    name = Path(entry["label"]).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def split(source: Path, out: Path, mapping: dict[str, str], ignore_unmatched: bool = False) -> dict[str, int]:
    """Write one folder per mapped prefix under ``out``; returns folder -> number of cases.

    Raises:
        ValueError: unmatched cases, prefixes without cases, or a target folder that exists and is not empty.
        FileNotFoundError: no ``dataset.json`` in ``source``.
    """
    meta_path = source / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(meta_path)!r} does not exist: SOURCE must be a raw dataset folder.")
    meta = json.loads(meta_path.read_text())
    ending = meta.get("file_ending", ".nii.gz")
    if isinstance(meta.get("training"), list):  # MSD v1 / nnU-Net v1: the training list names the cases
        cases = {_case_of(e): e for e in meta["training"]}
    else:  # nnU-Net v2: the label files are the cases
        cases = {p.name[: -len(ending)]: None for p in sorted((source / "labelsTr").glob(f"*{ending}"))}
    groups: dict[str, list[str]] = {folder: [] for folder in mapping.values()}
    unmatched = []
    for case in cases:
        prefix = next((p for p in mapping if case.startswith(p)), None)
        if prefix is None:
            unmatched.append(case)
        else:
            groups[mapping[prefix]].append(case)
    if unmatched and not ignore_unmatched:
        raise ValueError(f"{len(unmatched)} case(s) match no prefix of {sorted(mapping)}: {unmatched[:5]}...")
    empty = sorted(folder for folder, names in groups.items() if not names)
    if empty:
        raise ValueError(f"no case of {str(source)!r} for folder(s) {empty}; check the prefixes.")
    busy = [str(out / f) for f in groups if (out / f).exists() and (not (out / f).is_dir() or any((out / f).iterdir()))]
    if busy:
        raise ValueError(f"target(s) exist and are not empty folders: {busy}.")

    def images(case: str) -> list[Path]:
        found = sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
        return found or sorted((source / "imagesTr").glob(f"{case}{ending}"))

    missing = [f"{c}: no image in imagesTr/" for names in groups.values() for c in names if not images(c)]
    missing += [f"{c}: no labelsTr/{c}{ending}" for names in groups.values() for c in names
                if not (source / "labelsTr" / f"{c}{ending}").is_file()]  # fmt: skip
    if missing:
        raise ValueError(f"{len(missing)} case file(s) missing in {str(source)!r}: {missing[:5]}...")
    for folder, names in groups.items():
        for sub in ("imagesTr", "labelsTr"):
            (out / folder / sub).mkdir(parents=True, exist_ok=True)
        for case in names:
            for src in images(case):
                os.symlink(src.resolve(), out / folder / "imagesTr" / src.name)
            label = source / "labelsTr" / f"{case}{ending}"
            os.symlink(label.resolve(), out / folder / "labelsTr" / label.name)
        sub_meta = {k: v for k, v in meta.items() if k not in ("training", "test", "numTraining", "numTest")}
        sub_meta["name"] = folder
        if isinstance(meta.get("training"), list):
            sub_meta["training"] = [cases[c] for c in names]
            sub_meta["numTraining"] = len(names)
        else:
            sub_meta["numTraining"] = len(names)
            if isinstance(meta.get("dataset"), dict):  # nnU-Net v2's explicit case mapping: this folder's cases only
                sub_meta["dataset"] = {c: meta["dataset"][c] for c in names if c in meta["dataset"]}
        (out / folder / "dataset.json").write_text(json.dumps(sub_meta, indent=2))
    return {folder: len(names) for folder, names in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the raw folder holding several tasks (with dataset.json)")
    parser.add_argument("--out", type=Path, required=True, help="where the per-task folders go")
    parser.add_argument("--map", default=None, help="PREFIX=FOLDER,... (default: UniSeg's MOTS prefixes)")
    parser.add_argument("--ignore_unmatched", action="store_true", help="leave out cases that match no prefix")
    args = parser.parse_args(argv)
    try:
        counts = split(args.source, args.out, parse_map(args.map) if args.map else UNISEG_MOTS, args.ignore_unmatched)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for folder, n in counts.items():
        print(f"{args.out / folder}: {n} case(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

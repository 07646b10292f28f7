"""Task catalog: loading, saving, lookup, validation and selection."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import task_dict

from uniseg_components.networks.plans import plan_from_catalog
from uniseg_components.tasks import TaskCatalog, TaskSpec, UnknownTaskError, normalization_of


def _task(name: str, id: int, **kw) -> dict:
    return {**task_dict(name, id, patch=(32, 32, 32)), **kw}


@pytest.fixture(scope="module")
def uniseg11() -> TaskCatalog:
    return TaskCatalog.builtin("uniseg_11tasks")


# ----------------------------------------------------------------------------- builtin catalogs
def test_available_builtins():
    avail = TaskCatalog.available_builtins()
    assert "uniseg_11tasks" in avail and "demo" in avail
    with pytest.raises(ValueError, match="nope"):
        TaskCatalog.builtin("nope")


def test_uniseg11_structure(uniseg11):
    assert len(uniseg11) == 11 and uniseg11.num_tasks == 11
    assert [t.id for t in uniseg11] == list(range(11))
    assert uniseg11.names == [
        "liver",
        "kidney",
        "hepatic_vessel",
        "pancreas",
        "colon",
        "lung",
        "spleen",
        "vertebrae",
        "prostate",
        "brats",
        "autopet",
    ]
    assert uniseg11.num_classes == [3, 3, 3, 3, 2, 2, 2, 2, 2, 4, 2]
    assert uniseg11.channel_counts == [1, 2, 4]
    assert uniseg11.max_classes == 4
    assert uniseg11.dims == [3]
    assert all(t.patch_size == (192, 192, 64) for t in uniseg11)


def test_uniseg11_merged_label_map(uniseg11):
    # UniSeg's all-task map: liver 1,2; kidney 3,4; hepatic 5,6; pancreas 7,8; colon 9; lung 10; spleen 11;
    # vertebrae 12; prostate 13; BraTS 14-16; PET lesion 17
    offsets = {t.name: t.label_offset for t in uniseg11}
    assert offsets == {
        "liver": 0,
        "kidney": 2,
        "hepatic_vessel": 4,
        "pancreas": 6,
        "colon": 8,
        "lung": 9,
        "spleen": 10,
        "vertebrae": 11,
        "prostate": 12,
        "brats": 13,
        "autopet": 16,
    }
    assert uniseg11.num_merged_labels == 18
    names = uniseg11.merged_label_names()
    assert sorted(names) == list(range(18))
    assert names[0] == "background"
    assert names[1] == "liver/liver"
    assert names[2] == "liver/liver tumour"
    assert names[11] == "spleen/spleen"
    assert names[14] == "brats/oedema" and names[16] == "brats/enhancing tumour"
    assert names[17] == "autopet/lesion"


def test_modalities_and_normalization(uniseg11):
    assert uniseg11["brats"].modalities == ("T1", "T1c", "T2", "FLAIR")
    assert uniseg11["autopet"].num_channels == 2
    assert normalization_of("CT") == "ct"
    assert normalization_of("PET") == "zscore"
    with pytest.raises(ValueError, match="unknown modality 'Xray'"):
        normalization_of("Xray")


# ----------------------------------------------------------------------------- lookup
def test_lookup_by_name_id_and_id_string(uniseg11):
    assert uniseg11["prostate"].id == 8
    assert uniseg11[8].name == "prostate"
    assert uniseg11["8"].name == "prostate"
    assert uniseg11.get(9).name == "brats"
    assert uniseg11[torch.tensor(10)].name == "autopet"
    assert uniseg11[uniseg11["liver"]].id == 0
    assert "spleen" in uniseg11 and 6 in uniseg11 and "6" in uniseg11
    assert "heart" not in uniseg11 and 11 not in uniseg11 and -1 not in uniseg11


@pytest.mark.parametrize("key", ["heart", 11, "11", -1, "-1"])
def test_unknown_task_error(uniseg11, key):
    with pytest.raises(UnknownTaskError) as info:
        uniseg11[key]
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    msg = str(err)
    assert repr(key if not (isinstance(key, str) and key.lstrip("-").isdigit()) else int(key)) in msg
    # lists the known tasks
    for name in ("liver", "brats", "autopet"):
        assert name in msg
    assert "uniseg_11tasks" in msg


def test_unknown_task_error_caught_as_keyerror_and_valueerror(uniseg11):
    with pytest.raises(KeyError):
        uniseg11["heart"]
    with pytest.raises(ValueError, match="heart"):
        uniseg11["heart"]


def test_bool_is_not_a_task_id(uniseg11):
    with pytest.raises(UnknownTaskError):
        uniseg11[True]


# ----------------------------------------------------------------------------- I/O
def test_save_load_round_trip(tmp_path, uniseg11):
    path = uniseg11.save(tmp_path / "sub" / "catalog.json")
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = TaskCatalog.load(path)
    assert loaded == uniseg11
    assert loaded.plan == uniseg11.plan
    assert [t.label_offset for t in loaded] == [t.label_offset for t in uniseg11]
    assert loaded["brats"] == uniseg11["brats"]
    # resolve accepts a path, a builtin name or a catalog
    assert TaskCatalog.resolve(str(path)) == uniseg11
    assert TaskCatalog.resolve("uniseg_11tasks") == uniseg11
    assert TaskCatalog.resolve(loaded) is loaded
    with pytest.raises(ValueError, match="neither"):
        TaskCatalog.resolve("not_a_catalog")


def test_custom_catalog_round_trip(tmp_path):
    cat = TaskCatalog(
        [_task("b", 1, labels=["bg", "x", "y"]), _task("a", 0, modalities=["CT", "PET"], label_offset=5)],
        name="custom",
        description="two tasks",
    )
    assert cat.names == ["a", "b"]  # sorted by id
    assert cat["a"].label_offset == 5 and cat["b"].label_offset == 6
    assert cat.num_merged_labels == 9
    loaded = TaskCatalog.load(cat.save(tmp_path / "c.json"))
    assert loaded == cat and loaded.name == "custom" and loaded.description == "two tasks"
    assert json.loads((tmp_path / "c.json").read_text())["tasks"][0]["modalities"] == ["CT", "PET"]


def test_load_missing_file_names_path(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TaskCatalog.load(path)


def test_load_corrupt_json_names_path(tmp_path):
    path = tmp_path / "corrupt.json"
    path.write_text('{"tasks": [ {"name": ')
    with pytest.raises(ValueError, match="corrupt.json.*not valid JSON"):
        TaskCatalog.load(path)


def test_load_invalid_catalog_names_path(tmp_path):
    path = tmp_path / "invalid.json"
    path.write_text(json.dumps({"tasks": [_task("a", 0), _task("a", 1)]}))
    with pytest.raises(ValueError, match="invalid.json.*duplicate task name"):
        TaskCatalog.load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="invalid.json"):
        TaskCatalog.load(path)


def test_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown field.*colour"):
        TaskSpec.from_dict({**_task("a", 0), "colour": "red"})
    bad = _task("a", 0)
    del bad["labels"]
    with pytest.raises(ValueError, match="missing field.*labels"):
        TaskSpec.from_dict(bad)
    with pytest.raises(ValueError, match="unknown field.*extra"):
        TaskCatalog.from_dict({"tasks": [_task("a", 0)], "extra": 1})


# ----------------------------------------------------------------------------- validation
def test_duplicate_names():
    with pytest.raises(ValueError, match=r"duplicate task name\(s\) \['a'\]"):
        TaskCatalog([_task("a", 0), _task("a", 1)])


def test_duplicate_ids():
    with pytest.raises(ValueError, match=r"duplicate task id\(s\) \[1\]"):
        TaskCatalog([_task("a", 0), _task("b", 1), _task("c", 1)])


def test_ids_not_dense():
    with pytest.raises(ValueError, match=r"dense from 0 to 1, got \[0, 2\]"):
        TaskCatalog([_task("a", 0), _task("b", 2)])
    with pytest.raises(ValueError, match="dense"):
        TaskCatalog([_task("a", 1)])


def test_empty_catalog():
    with pytest.raises(ValueError, match="no tasks"):
        TaskCatalog([])


def test_only_background():
    with pytest.raises(ValueError, match="task 'a'.*at least one foreground class"):
        TaskSpec.from_dict(_task("a", 0, labels=["background"]))


def test_duplicate_label_names():
    with pytest.raises(ValueError, match="label names must be unique"):
        TaskSpec.from_dict(_task("a", 0, labels=["background", "x", "x"]))


def test_unknown_modality():
    with pytest.raises(ValueError, match="task 'a'.*unknown modality 'Xray'"):
        TaskSpec.from_dict(_task("a", 0, modalities=["CT", "Xray"]))
    with pytest.raises(ValueError, match="at least one input channel"):
        TaskSpec.from_dict(_task("a", 0, modalities=[]))


def test_spacing_and_patch_length_must_match_dims():
    with pytest.raises(ValueError, match="task 'a'.*spacing must have 3 positive values"):
        TaskSpec.from_dict(_task("a", 0, spacing=[1.0, 1.0]))
    with pytest.raises(ValueError, match="task 'a'.*patch_size must have 3 positive values"):
        TaskSpec.from_dict(_task("a", 0, patch_size=[32, 32]))
    with pytest.raises(ValueError, match="spacing must have 2 positive values"):
        TaskSpec.from_dict(_task("a", 0, dims=2, patch_size=[32, 32]))
    with pytest.raises(ValueError, match="spacing must have 3 positive values"):
        TaskSpec.from_dict(_task("a", 0, spacing=[1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        TaskSpec.from_dict(_task("a", 0, dims=4))
    # a correct 2D task is fine
    t = TaskSpec.from_dict(_task("a", 0, dims=2, spacing=[1, 1], patch_size=[64, 64]))
    assert t.dims == 2 and t.spacing == (1.0, 1.0) and t.patch_size == (64, 64)


def test_overlapping_label_offsets():
    tasks = [_task("a", 0, labels=["bg", "x", "y"], label_offset=0), _task("b", 1, label_offset=1)]
    with pytest.raises(ValueError, match="merged label 2 is used by both a/y and b/fg"):
        TaskCatalog(tasks)
    # non-overlapping explicit offsets are kept
    ok = TaskCatalog([_task("a", 0, labels=["bg", "x", "y"], label_offset=0), _task("b", 1, label_offset=10)])
    assert ok["b"].label_offset == 10 and ok.num_merged_labels == 12
    with pytest.raises(ValueError, match="label_offset must be >= 0"):
        TaskSpec.from_dict(_task("a", 0, label_offset=-1))


# ----------------------------------------------------------------------------- selection
def test_select_dims_renumbers_densely():
    demo = TaskCatalog.builtin("demo")
    assert demo.dims == [2, 3]
    three = demo.select(dims=3)
    assert three.names == ["abdomen_ct", "brain_mr", "lesion_petct"]
    assert [t.id for t in three] == [0, 1, 2]
    assert three.dims == [3]
    assert three.plan == demo.plan
    two = demo.select(dims=2)
    assert two.names == ["fetal_us", "chest_xr", "skin_lesion"] and [t.id for t in two] == [0, 1, 2]
    assert [t.label_offset for t in two] == [0, 1, 3]
    assert two.channel_counts == [1, 3]


def test_demo_catalog_2d_tasks():
    demo = TaskCatalog.builtin("demo")
    assert demo.names[:4] == ["abdomen_ct", "brain_mr", "lesion_petct", "fetal_us"]  # existing ids unchanged
    assert demo["chest_xr"].id == 4 and demo["skin_lesion"].id == 5
    assert demo["chest_xr"].modalities == ("XR",) and demo["chest_xr"].labels == ("background", "lungs", "heart")
    assert demo["skin_lesion"].modalities == ("Dermoscopy",) * 3 and demo["skin_lesion"].num_channels == 3
    in_plane = plan_from_catalog(demo).total_stride[:2]
    assert in_plane == (8, 8)
    for t in demo.select(dims=2):
        assert all(p % s == 0 for p, s in zip(t.patch_size, in_plane)), t.name


def test_meduniseg17_structure(uniseg11):
    cat = TaskCatalog.builtin("meduniseg_17tasks")
    assert "meduniseg_17tasks" in TaskCatalog.available_builtins()
    assert len(cat) == 17 and [t.id for t in cat] == list(range(17))
    assert [t.dims for t in cat] == [3] * 11 + [2] * 6
    # the first 11 tasks and the plan are UniSeg's, unchanged (label offsets included)
    assert cat.tasks[:11] == uniseg11.tasks
    assert cat.plan == uniseg11.plan
    assert "not public" in cat.description or "not all public" in cat.description
    two = cat.select(dims=2)
    assert two.names == ["skin_lesion", "polyp", "chest_xr_lung", "optic_disc_cup", "breast_us", "gland"]
    assert 3 in cat.channel_counts and cat.channel_counts == [1, 2, 3, 4]
    assert {"Dermoscopy", "Endoscopy", "XR", "Fundus", "US", "Histology"} <= set(cat.modalities)
    assert cat["optic_disc_cup"].foreground == ("optic disc", "optic cup")
    assert cat.num_merged_labels == uniseg11.num_merged_labels + 7
    # MedUniSeg runs 2D tasks as depth-1 volumes through the 3D plan: in-plane patch divisible by its stride
    plan = plan_from_catalog(cat)
    in_plane = plan.total_stride[:2]
    assert in_plane == (32, 32)
    for t in two:
        assert t.dataset and t.description and len(t.spacing) == 2
        assert all(p % s == 0 for p, s in zip(t.patch_size, in_plane)), t.name


def test_select_names_keeps_old_order_and_recomputes_offsets(uniseg11):
    sub = uniseg11.select(names=["autopet", "brats", "kidney"])
    assert sub.names == ["kidney", "brats", "autopet"]
    assert [t.id for t in sub] == [0, 1, 2]
    assert [t.label_offset for t in sub] == [0, 2, 5]
    assert sub.num_merged_labels == 7
    assert sub.channel_counts == [1, 2, 4]
    with pytest.raises(UnknownTaskError):
        uniseg11.select(names=["heart"])
    with pytest.raises(ValueError, match="keeps no task"):
        uniseg11.select(dims=2)


def test_tasks_for_channels(uniseg11):
    ct = uniseg11.tasks_for_channels(["CT"])
    assert [t.id for t in ct] == list(range(8))
    assert [t.name for t in uniseg11.tasks_for_channels(["CT", "PET"])] == ["autopet"]
    assert [t.name for t in uniseg11.tasks_for_channels(["T1", "T1c", "T2", "FLAIR"])] == ["brats"]
    assert [t.name for t in uniseg11.tasks_for_channels(("T2",))] == ["prostate"]
    assert uniseg11.tasks_for_channels(["PET", "CT"]) == []


def test_catalogs_and_packaging_load_without_torch_or_monai():
    """Reading a catalog, JSON files or listing a release needs neither torch nor MONAI (seconds of start-up):
    those are imported where tensors or transforms are used."""
    import subprocess
    import sys

    code = (
        "import sys; import uniseg_components.tasks, uniseg_components.io, uniseg_components.packaging; "
        "from uniseg_components.tasks import TaskCatalog; TaskCatalog.builtin('demo'); "
        "heavy = sorted(m for m in ('torch', 'monai') if m in sys.modules); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sample_weight_field():
    """Hermes' dataset weight per task: default 1 (left out of the JSON), round trip, positive numbers only."""
    plain = TaskSpec.from_dict(task_dict("a", 0))
    assert plain.sample_weight == 1.0 and "sample_weight" not in plain.to_dict()
    heavy = TaskSpec.from_dict(task_dict("a", 0, sample_weight=1.8))
    assert heavy.to_dict()["sample_weight"] == 1.8 and TaskSpec.from_dict(heavy.to_dict()) == heavy
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="sample_weight"):
            TaskSpec.from_dict(task_dict("a", 0, sample_weight=bad))

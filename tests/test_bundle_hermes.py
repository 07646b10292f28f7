# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The Hermes bundle: train, evaluate, inference (one task, all targets merged, per-target masks), MONAI Label
keys, resume, multi-GPU overlay, export, release zip and the incremental ``add_tasks.json`` overlay.

Runs the configs on a tiny demo collection (3 cases per 3D task, 1 batch per task per epoch) on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.engines.utils import IterationEvents

pytest.importorskip("nilearn")

from conftest import (  # noqa: E402
    BUNDLES,
    FAST,
    SCHEMA,
    assert_same_training_state,
    batch_recorder_overlay,
    config,
    evaluate_run,
    interrupted_and_resumed,
    latest_state,
    monai_label_pipeline,
    monai_label_training,
    recorded_batches,
    run,
    run_vendored_inference,
    torchrun_training,
    workflow,
)

from uniseg_components.bundle import BundleData, items_of_tasks  # noqa: E402
from uniseg_components.checkpoints import (  # noqa: E402
    checkpoint_catalog,  # noqa: E402
    load_checkpoint,
    save_checkpoint,
)
from uniseg_components.handlers import GradientClipHandler  # noqa: E402
from uniseg_components.methods.hermes import Hermes  # noqa: E402
from uniseg_components.methods.hermes.incremental import extended_catalog  # noqa: E402
from uniseg_components.optimizers import WarmupPolyLR  # noqa: E402
from uniseg_components.tasks import TaskCatalog  # noqa: E402

BUNDLE = "hermes_universal_segmentation"
INFERENCE, METADATA = config(BUNDLE, "inference.json"), config(BUNDLE, "metadata.json")
TASKS = ["abdomen_ct", "brain_mr", "lesion_petct"]
#: the previous recipe (AdamW, no warm-up, no EMA, clipping at 12, plain Dice): the overrides docs/README.md gives
PREVIOUS = {
    "optimizer_name": "adamw",
    "optimizer_eps": 1e-8,
    "warmup_epochs": 0,
    "ema_decay": 0,
    "max_grad_norm": 12.0,
    "adaptive_tversky": False,
}
pytestmark = pytest.mark.usefixtures("single_thread")


def _recorded_tasks(output_dir: Path, rank: int = 0) -> list[list[str]]:
    return [b["tasks"] for b in recorded_batches(output_dir, rank)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training run from an absent dataset_dir (the demo is built there), mixed-task batches, validation."""
    root = tmp_path_factory.mktemp("hermes")
    wf = workflow(BUNDLE, ["train.json", batch_recorder_overlay(root)], root, demo_cases=3, **FAST)
    assert wf.check_properties() in (None, [])
    run(wf)
    return root


def _images(trained: Path, task: str) -> list[Path]:
    folder = trained / "demo_data" / TaskCatalog.builtin("demo")[task].dataset / "imagesTr"
    return sorted(folder.glob("*.nii.gz"))


# ---------------------------------------------------------------------------------------------- training
def test_train_writes_model_tensorboard_and_dice_table(trained):
    datalist = json.loads((trained / "demo_data" / "datalist.json").read_text())
    assert {it["task"] for it in datalist["training"]} == set(TASKS)
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    assert isinstance(net, Hermes) and cat.names == TASKS
    raw = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert set(raw["model"]) == set(net.state_dict())  # exactly network_def's keys (MONAI Label loads these)
    assert not any(k.startswith("module.") for k in raw["model"])
    latest = torch.load(trained / "models" / "checkpoint_latest.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "meta"} <= set(latest)
    assert latest["trainer"]["epoch_length"] == 3 and latest["trainer"]["iteration"] == 3
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    summary = json.loads((trained / "eval" / "val_dice_per_task.json").read_text())
    assert set(summary["per_task"]) == set(TASKS)
    assert 0.0 <= summary["mean"] <= 1.0
    # mixed batches: 1-channel tasks (abdomen_ct CT, brain_mr T1) may share a batch, lesion_petct (2 channels) not
    for batch in _recorded_tasks(trained / "eval"):
        assert len(batch) == 2 and ("lesion_petct" not in batch or set(batch) == {"lesion_petct"})


def test_train_recipe_and_properties(trained):
    """The default is the authors' recipe; the previous one is the overrides the docs give."""
    from pytorch_optimizer import Lamb

    wf = workflow(BUNDLE, "train.json", trained / "recipe", dataset_dir=str(trained / "demo_data"))
    assert wf.check_properties() in (None, [])
    p = wf.parser
    assert p["epochs"] == 200 and p["batches_per_task"] == 40 and p["batch_size"] == 2 and p["mix_tasks"] is True
    assert p["learning_rate"] == 0.002 and p["weight_decay"] == 1e-5 and p["poly_power"] == 0.9
    assert p["modality_weight"] == 0.01 and p["train"]["trainer"]["decollate"] is False
    assert p["training"] == p["run"]
    assert isinstance(p.get_parsed_content("network_def"), Hermes)
    opt = p.get_parsed_content("optimizer")
    assert isinstance(opt, Lamb) and opt.defaults["max_grad_norm"] == 1.0 and opt.pre_norm
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.002 * math.exp(-10)) and group["betas"] == (0.9, 0.999)
    assert group["eps"] == 1e-5 and group["weight_decay"] == 1e-5 and group["weight_decouple"] is False
    sched = p.get_parsed_content("lr_scheduler")
    assert isinstance(sched, WarmupPolyLR) and (sched.total_iters, sched.warmup_epochs, sched.power) == (200, 5, 0.9)
    ema = p.get_parsed_content("ema")
    assert ema.decay == 0.99 and ema.ramp_up and p.get_parsed_content("eval_network") is ema.network
    assert ema.network is not p.get_parsed_content("network")
    assert p.get_parsed_content("validate#evaluator").network is ema.network
    loss = p.get_parsed_content("loss")
    assert loss.adaptive_tversky and loss.detach_alpha and loss.alpha_range == (0.2, 0.8)
    assert not any(isinstance(h, GradientClipHandler) for h in p.get_parsed_content("train#handlers"))
    trainer = p.get_parsed_content("train#trainer")  # the EMA updates after every optimiser step
    assert trainer.has_event_handler(ema, IterationEvents.MODEL_COMPLETED)

    # the previous recipe, as docs/README.md gives it
    old = workflow(BUNDLE, "train.json", trained / "recipe_old", dataset_dir=str(trained / "demo_data"), **PREVIOUS)
    p = old.parser
    opt = p.get_parsed_content("optimizer")
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["eps"] == 1e-8
    assert opt.param_groups[0]["lr"] == 0.002 and opt.param_groups[0]["weight_decay"] == 1e-5
    sched = p.get_parsed_content("lr_scheduler")
    assert [sched.factor(e) for e in (0, 1, 100)] == pytest.approx([1.0, (1 - 1 / 200) ** 0.9, 0.5**0.9])
    ema = p.get_parsed_content("ema")
    assert not ema.enabled and p.get_parsed_content("eval_network") is p.get_parsed_content("network")
    assert not p.get_parsed_content("train#trainer").has_event_handler(ema, IterationEvents.MODEL_COMPLETED)
    assert not p.get_parsed_content("loss").adaptive_tversky
    (clip,) = [h for h in p.get_parsed_content("train#handlers") if isinstance(h, GradientClipHandler)]
    assert clip.max_norm == 12.0


#: the default recipe's short run: brain_mr only, 1 batch per epoch, the 5 warm-up epochs and 2 more, validation
#: after the last one
RECIPE_RUN = {"tasks": "brain_mr", "epochs": 7, "batches_per_task": 1, "augment": False, "val_interval": 7}


@pytest.fixture(scope="module")
def recipe_run(trained, tmp_path_factory) -> dict:
    """train.json with its default recipe (LAMB, warm-up, EMA, adaptive Tversky), short: the learning rate of every
    iteration, the initial and final live weights, and the loss of one fixed batch under each."""
    from ignite.engine import Events

    root = tmp_path_factory.mktemp("hermes_recipe")
    wf = workflow(BUNDLE, "train.json", root, dataset_dir=str(trained / "demo_data"), **RECIPE_RUN)
    p = wf.parser
    net, trainer = p.get_parsed_content("network"), p.get_parsed_content("train#trainer")
    initial = copy.deepcopy(net.state_dict())
    lrs = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]))
    run(wf)
    torch.manual_seed(0)
    x, y, _, kwargs = trainer.prepare_batch(next(iter(p.get_parsed_content("train#dataloader"))), "cpu")
    loss_fn = p.get_parsed_content("loss")

    def fixed_batch_loss(state: dict) -> float:
        m = copy.deepcopy(net)
        m.load_state_dict(state)
        with torch.no_grad():
            return float(loss_fn(m.train()(x, **kwargs), y))

    ema = p.get_parsed_content("ema")
    losses = {k: fixed_batch_loss(s) for k, s in (("initial", initial), ("final", net.state_dict()))}
    losses["ema"] = fixed_batch_loss(ema.network.state_dict())
    return {"root": root, "lrs": lrs, "losses": losses, "ema": ema, "dataset_dir": str(trained / "demo_data")}


def test_default_recipe_lowers_the_loss(recipe_run):
    """Seven iterations of the default recipe (five at warm-up rates) lower the loss of a fixed training batch, for
    the trained weights and their EMA (deterministic: same batch, same network)."""
    losses = recipe_run["losses"]
    assert losses["final"] < 0.99 * losses["initial"]
    assert losses["final"] < losses["ema"] < losses["initial"]  # the EMA lags the trained weights


def test_default_recipe_learning_rate_per_epoch(recipe_run):
    """The bundle steps the schedule once per epoch: e^(10 (e / w - 1)) of 2e-3 for epochs e = 0..w, then
    (1 - e / E)^0.9, with the warm-up w the authors' share of the epochs (5 of 200), between 1 and 5: 1 for this
    7-epoch run."""
    from monai.bundle import ConfigParser

    expected = [0.002 * (math.exp(10 * (e - 1)) if e <= 1 else (1 - e / 7) ** 0.9) for e in range(7)]
    assert recipe_run["lrs"] == pytest.approx(expected, rel=1e-12)
    latest = latest_state(recipe_run["root"])
    assert latest["lr_scheduler"]["last_epoch"] == 7 and latest["lr_scheduler"]["warmup_epochs"] == 1
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / BUNDLE / "configs" / "train.json"))
    warmup = {}
    for epochs in (200, 400, 120, 30, 10):
        parser["epochs"] = epochs
        warmup[epochs] = parser.get_parsed_content("warmup_epochs", instantiate=True, lazy=False)
    assert warmup == {200: 5, 400: 5, 120: 3, 30: 1, 10: 1}


def test_checkpoints_hold_the_ema_weights_and_evaluate_scores_them(recipe_run, capsys):
    """model.pt (best) and model_final.pt hold the EMA weights under "model", not the trained ones (which only the
    resume checkpoint holds); evaluate.json loads and scores exactly those, as training's validation did."""
    root, ema = recipe_run["root"], recipe_run["ema"]
    latest = latest_state(root)
    assert latest["ema"]["num_updates"] == 7 and latest["ema"]["decay"] == 0.99
    averaged = latest["ema"]["weights"]
    for k, v in ema.network.state_dict().items():
        assert torch.equal(averaged[k], v), k
    assert max(float((averaged[k] - v).abs().max()) for k, v in latest["model"].items()) > 1e-4  # not the live ones
    for name in ("model.pt", "model_final.pt"):
        saved = torch.load(root / "models" / name, weights_only=True)["model"]
        assert set(saved) == set(averaged) and all(torch.equal(saved[k], averaged[k]) for k in saved), name
    net, _ = load_checkpoint(root / "models" / "model_final.pt")  # what evaluate / infer / export read
    assert all(torch.equal(v, averaged[k]) for k, v in net.state_dict().items())
    # evaluate.json on the final weights, with training's validation protocol: the EMA scores as in validation
    overrides = {"eval_checkpoint": "final", "eval_mirror": False, "validate#inferer#mode": "constant"}
    data = recipe_run["dataset_dir"]
    wf = run(
        workflow(BUNDLE, ["train.json", "evaluate.json"], root, "eval", dataset_dir=data, **overrides, **RECIPE_RUN)
    )
    evaluated = wf.parser.get_parsed_content("validate#evaluator").network.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in evaluated.items())
    saved = json.loads((root / "eval" / "dice_per_task.json").read_text())
    val = json.loads((root / "eval" / "val_dice_per_task.json").read_text())
    assert saved["mean"] == pytest.approx(val["mean"], abs=1e-6)
    assert "mean over tasks" in capsys.readouterr().out


def test_evaluate_prints_and_saves_per_task_dice(trained, capsys):
    out = evaluate_run(BUNDLE, trained, capsys)
    assert "Dice per task and class" in out and "lesion_petct" in out


def test_monai_label_overrides_without_task_and_validation(trained, tmp_path):
    """MONAI Label: task-less {image, label} items, an empty validation list, its own max_epochs."""
    model = monai_label_training(BUNDLE, tmp_path, trained / "demo_data", "abdomen_ct", batches_per_task=1)
    net, cat = load_checkpoint(model)
    assert cat.names == TASKS


def test_resume_gives_the_same_weights(trained, tmp_path):
    """Resume restores the weights, optimiser, schedule and the EMA (a 1-epoch warm-up: the resumed epoch trains at
    the full learning rate)."""
    common = {"dataset_dir": str(trained / "demo_data"), "validate#dataset#data": [], "batches_per_task": 1}
    common.update(tasks="abdomen_ct,brain_mr", augment=True, warmup_epochs=1)  # two mixable tasks: 2 mixed batches
    states = interrupted_and_resumed(BUNDLE, tmp_path, epochs=2, **common)
    assert states["interrupted"]["trainer"]["iteration"] == 2 and states["interrupted"]["ema"]["num_updates"] == 2
    assert states["full"]["trainer"]["iteration"] == 4 and states["full"]["lr_scheduler"]["last_epoch"] == 2
    assert_same_training_state(states["full"], states["resumed"])
    full, resumed = states["full"]["ema"], states["resumed"]["ema"]
    assert full["num_updates"] == resumed["num_updates"] == 4
    for k, v in full["weights"].items():  # the average continued: the same as the uninterrupted run's
        assert torch.allclose(v, resumed["weights"][k], atol=1e-6), k
    moved = max(float((v - states["interrupted"]["ema"]["weights"][k]).abs().max()) for k, v in full["weights"].items())
    assert moved > 1e-4  # the resumed epoch changed the average
    assert load_checkpoint(tmp_path / "full" / "models" / "model.pt")[1].names == ["abdomen_ct", "brain_mr"]


def test_multi_gpu_overlay_two_cpu_processes(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP with unused task tokens, rank-sharded mixed sampler, rank 0 saves."""
    args = [
        "--dataset_dir",
        str(trained / "demo_data"),
        "--epochs",
        "1",
        "--batches_per_task",
        "2",
        "--augment",
        "False",
    ]
    torchrun_training(BUNDLE, tmp_path, *args, overlays=[batch_recorder_overlay(tmp_path)])
    seen = {r: _recorded_tasks(tmp_path / "eval", r) for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 3  # 3 tasks x 2 batches over 2 ranks
    net, cat = load_checkpoint(tmp_path / "models" / "model.pt")
    assert isinstance(net, Hermes) and cat.names == TASKS
    latest = latest_state(tmp_path)
    assert latest["ema"]["num_updates"] == 3  # the EMA of the unwrapped network, every step: saved as the model
    assert all(torch.equal(v, latest["ema"]["weights"][k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------------- inference
def _infer(trained: Path, out: Path, image: Path, **override) -> list[Path]:
    """inference.json in-process (``monai.bundle run`` does the same) on one image."""
    wf = workflow(BUNDLE, "inference.json", trained, "infer", meta_file=METADATA, device="cpu", datalist=[str(image)],
                  output_dir=str(out), **override)  # fmt: skip
    assert wf.check_properties() == []
    run(wf)
    return sorted(out.glob("*.nii.gz"))


def test_inference_single_task_and_multilabel_masks(trained, tmp_path):
    image = _images(trained, "brain_mr")[0]
    (seg,) = _infer(trained, tmp_path / "label", image, task="brain_mr")
    assert seg.name == image.name.replace(".nii.gz", "_brain_mr.nii.gz")
    src, lab = nib.load(str(image)), nib.load(str(seg))
    assert lab.shape == src.shape[:3]
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    label = np.asarray(lab.dataobj)
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}

    (masks_file,) = _infer(trained, tmp_path / "masks", image, task="brain_mr", multilabel=True)
    assert masks_file.name == image.name.replace(".nii.gz", "_brain_mr_masks.nii.gz")
    masks = np.asarray(nib.load(str(masks_file)).dataobj)
    masks = masks.reshape(*src.shape[:3], -1)  # one channel per target: csf, grey matter, white matter
    assert masks.shape[-1] == 3 and set(np.unique(masks).tolist()) <= {0, 1}
    np.testing.assert_allclose(nib.load(str(masks_file)).affine, src.affine, atol=1e-4)
    # the label map is the masks resolved by the highest probability: background exactly where no mask is set
    np.testing.assert_array_equal(label > 0, masks.any(-1))
    for k in (1, 2, 3):
        assert masks[..., k - 1][label == k].all()


def test_inference_all_targets_merged(trained, tmp_path):
    image = _images(trained, "abdomen_ct")[0]
    (seg,) = _infer(trained, tmp_path, image, task="all", modality="CT")
    assert seg.name == image.name.replace(".nii.gz", "_all.nii.gz")
    src, lab = nib.load(str(image)), nib.load(str(seg))
    assert lab.shape == src.shape
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2}  # CT-only tasks: abdomen_ct, offset 0


def test_inference_config_keys_and_metadata():
    raw = Path(INFERENCE).read_text()
    assert "@_meta_" not in raw and "_meta_#" not in raw and "_meta_::" not in raw
    cfg = json.loads(raw)
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root", "dataset_dir"):
        assert key in cfg, key
    meta = json.loads(Path(METADATA).read_text())
    assert meta["version"] in meta["changelog"]
    first_out = next(iter(meta["network_data_format"]["outputs"].values()))
    default = TaskCatalog.builtin("demo")[cfg["task"]]
    assert first_out["channel_def"] == {str(i + 1): name for i, name in enumerate(default.foreground)}  # map values
    assert first_out["num_channels"] == default.num_classes - 1  # one sigmoid channel per target, no background
    assert set(meta["eval_metrics"]) >= {"val_mean_dice"}
    if SCHEMA.is_file():
        from monai.bundle import verify_metadata

        verify_metadata(
            meta_file=METADATA,
            filepath=str(SCHEMA),
            hash_val="06954cad2cc5d3784e72077ac76f0fc8",
            hash_type="md5",
            create_dir=False,
        )
    from monai.bundle import verify_net_in_out

    # network_def in eval mode with the default task's id: one output channel per target, as the metadata says
    verify_net_in_out(
        net_id="network_def", meta_file=METADATA, config_file=INFERENCE, device="cpu", extra_forward_args={"task_id": 0}
    )


def test_monai_label_style_inference(trained):
    """network_def + models/model.pt ('model' key), preprocessing, inferer(inputs, network), postprocessing."""
    network, pre, post, inferer = monai_label_pipeline(BUNDLE, trained)
    image = _images(trained, "abdomen_ct")[0]
    # MONAI Label's request: no task (the config's default is used), and "image_path" beside "image"
    data = pre({"image": str(image), "image_path": str(image)})
    assert data["task"] == "abdomen_ct"
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert data["pred"].shape[0] == 2  # organ, tumour: one sigmoid channel per target
    pred = post(data)["pred"]
    src = nib.load(str(image))
    assert pred.shape == (1, *src.shape)  # a single-channel label map, as MONAI Label needs
    np.testing.assert_allclose(np.asarray(pred.affine), src.affine, atol=1e-4)
    assert set(torch.unique(pred).tolist()) <= {0.0, 1.0, 2.0}


# ---------------------------------------------------------------------------------------------- incremental
@pytest.fixture(scope="module")
def upstream_two_tasks(tmp_path_factory) -> Path:
    """A bundle root whose models/model.pt is a seeded Hermes of two demo tasks (brain_mr, lesion_petct)."""
    root = tmp_path_factory.mktemp("hermes_upstream2")
    torch.manual_seed(0)
    cat = TaskCatalog.builtin("demo").select(names=["brain_mr", "lesion_petct"])
    save_checkpoint(root / "models" / "model.pt", Hermes.from_catalog(cat), cat)
    return root


def test_add_tasks_trains_only_the_new_task_and_keeps_old_outputs(trained, upstream_two_tasks):
    root = upstream_two_tasks
    upstream_bytes = (root / "models" / "model.pt").read_bytes()
    overlays = ["train.json", "add_tasks.json", batch_recorder_overlay(root)]
    # the new task's data is in the upstream's data folder: catalog "demo" names it, the datalist holds it
    wf = workflow(
        BUNDLE, overlays, root, dataset_dir=str(trained / "demo_data"), catalog="demo", epochs=1, batches_per_task=2
    )
    assert wf.parser.get_parsed_content("added_tasks") == ["abdomen_ct"]
    run(wf)
    assert (root / "models" / "model.pt").read_bytes() == upstream_bytes  # the upstream model is not overwritten
    tasks = _recorded_tasks(root / "eval" / "add_tasks")
    assert tasks and all(t == ["abdomen_ct", "abdomen_ct"] for t in tasks)  # new task's data only
    new, cat = load_checkpoint(root / "models" / "add_tasks" / "model.pt")
    assert cat.names == ["brain_mr", "lesion_petct", "abdomen_ct"]
    assert TaskCatalog.load(root / "models" / "add_tasks" / "tasks.json").names == cat.names
    summary = json.loads((root / "eval" / "add_tasks" / "val_dice_per_task.json").read_text())
    assert list(summary["per_task"]) == ["abdomen_ct"]  # validated on the new task
    old, _ = load_checkpoint(root / "models" / "model.pt")
    for task_id, channels in ((0, 1), (1, 2)):  # frozen: the old tasks' outputs are bit for bit the upstream's
        x = torch.rand(1, channels, 48, 48, 48, generator=torch.Generator().manual_seed(task_id))
        with torch.no_grad():
            assert torch.equal(new(x, task_id=task_id), old(x, task_id=task_id))
    # the extended model serves the new task through inference.json with the saved catalog
    image = _images(trained, "abdomen_ct")[0]
    out = root / "pred"
    (seg,) = _infer(
        root, out, image, task="abdomen_ct", catalog=str(root / "models" / "add_tasks" / "tasks.json"),
        ckpt_dir=str(root / "models" / "add_tasks"),
    )  # fmt: skip
    assert nib.load(str(seg)).shape == nib.load(str(image)).shape


def test_add_tasks_default_adds_the_held_out_demo_task(trained, tmp_path):
    """Defaults: catalog ``demo_new_tasks`` adds kidney_ct, whose demo data is written into ``demo_data_new``;
    ``--validate_all_tasks`` scores the old tasks on the upstream's data folder as well."""
    root = tmp_path / "bundle"
    overlays = ["train.json", "add_tasks.json", batch_recorder_overlay(tmp_path)]
    override = dict(pretrained=str(trained / "models" / "model.pt"), upstream_dataset_dir=str(trained / "demo_data"))
    wf = workflow(BUNDLE, overlays, root, demo_cases=3, validate_all_tasks=True, **override, **FAST)
    assert wf.parser.get_parsed_content("added_tasks") == ["kidney_ct"]
    run(wf)
    written = sorted(p.name for p in (root / "demo_data_new").iterdir())
    assert written == ["Demo07_KidneyCT", "datalist.json", "tasks.json"]
    assert not (root / "demo_data").exists()  # the upstream data is read where it is
    tasks = _recorded_tasks(root / "eval" / "add_tasks")
    assert tasks and all(set(t) == {"kidney_ct"} for t in tasks)
    new, cat = load_checkpoint(root / "models" / "add_tasks" / "model.pt")
    assert cat.names == [*TASKS, "kidney_ct"] and list(cat["kidney_ct"].labels) == ["background", "kidney", "spleen"]
    summary = json.loads((root / "eval" / "add_tasks" / "val_dice_per_task.json").read_text())
    assert list(summary["per_task"]) == [*TASKS, "kidney_ct"]  # every task validated
    assert list(summary["per_task"]["kidney_ct"]) == ["kidney", "spleen"]
    old, _ = load_checkpoint(trained / "models" / "model.pt")
    x = torch.rand(1, 1, 48, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # frozen by default: abdomen_ct's outputs are the upstream's
        assert torch.equal(new(x, task_id=0), old(x, task_id=0))
    # without validate_all_tasks the upstream data is not read at all
    again = {**override, "upstream_dataset_dir": str(tmp_path / "no")}
    wf = workflow(BUNDLE, ["train.json", "add_tasks.json"], root / "again", **again)
    assert wf.parser.get_parsed_content("upstream_data") is None
    assert wf.parser.get_parsed_content("added_tasks") == ["kidney_ct"]


def test_bundle_helpers_for_incremental_runs(trained, upstream_two_tasks):
    ckpt = upstream_two_tasks / "models" / "model.pt"
    assert checkpoint_catalog(ckpt).names == ["brain_mr", "lesion_petct"]
    ext = extended_catalog(ckpt, "demo")
    assert ext.names == ["brain_mr", "lesion_petct", "abdomen_ct"] and [t.id for t in ext] == [0, 1, 2]
    old = checkpoint_catalog(ckpt)
    for t in old:  # old tasks keep their label offsets, hence Hermes' target ids
        assert ext[t.name].label_offset == t.label_offset
    with pytest.raises(ValueError, match="already a task of the upstream"):
        extended_catalog(ckpt, "demo", new_tasks="brain_mr")
    with pytest.raises(ValueError, match="only 3D tasks"):
        extended_catalog(ckpt, "demo", new_tasks=["fetal_us"])
    with pytest.raises(ValueError, match="no 3D task that the upstream model lacks"):
        extended_catalog(ext, "demo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_catalog(upstream_two_tasks / "missing.pt")

    items = [{"image": "a", "task": "abdomen_ct"}, {"image": "b", "task": "brain_mr"}, {"image": "c"}]
    assert items_of_tasks(items, "abdomen_ct") == [items[0]]
    assert items_of_tasks(items, ["brain_mr"], default_task="brain_mr") == items[1:]
    assert items_of_tasks(items, "lesion_petct", required=False) == []
    with pytest.raises(ValueError, match=r"no item of the task\(s\) \['lesion_petct'\]"):
        items_of_tasks(items, "lesion_petct")

    data = BundleData(trained / "demo_data", tasks="lesion_petct, brain_mr")
    assert data.catalog.names == ["brain_mr", "lesion_petct"] and [t.id for t in data.catalog] == [0, 1]
    assert {it["task"] for it in data.train + data.val} == {"brain_mr", "lesion_petct"}


# ---------------------------------------------------------------------------------------------- release
def test_release_zip_runs_inference_without_the_installed_package(trained, tmp_path):
    from uniseg_components.packaging import package

    zip_path = package(BUNDLES / BUNDLE, out=tmp_path / "dist", weights=trained / "models" / "model.pt")
    version = json.loads(Path(METADATA).read_text())["version"]
    assert zip_path.name == f"{BUNDLE}_v{version}.zip"
    names = zipfile.ZipFile(zip_path).namelist()
    for required in ("LICENSE", "configs/add_tasks.json", "configs/inference.json", "models/model.pt"):
        assert f"{BUNDLE}/{required}" in names
    assert f"{BUNDLE}/scripts/methods/hermes/network.py" in names
    meta = json.loads(zipfile.ZipFile(zip_path).read(f"{BUNDLE}/configs/metadata.json"))
    # MONAI Label names the saved map's values by outputs.pred.channel_def: organ 1, tumour 2 (not the channels)
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"1": "organ", "2": "tumour"}
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / BUNDLE
    image = _images(trained, "lesion_petct")[0]
    out_dir = tmp_path / "pred"
    run_vendored_inference(root, datalist=[str(image)], task="lesion_petct", output_dir=str(out_dir), device="cpu")
    (pred,) = out_dir.glob("*.nii.gz")
    assert nib.load(str(pred)).shape == nib.load(str(image)).shape[:3]
    assert set(np.unique(np.asarray(nib.load(str(pred)).dataobj)).tolist()) <= {0, 1}


def test_export_cli_torchscript_matches_the_bundle_model(trained, tmp_path):
    """``python -m uniseg_components export`` on the bundle's model.pt: the TorchScript takes the request."""
    from uniseg_components import cli

    written = cli.export(str(trained / "models" / "model.pt"), out=str(tmp_path), formats="torchscript")
    assert written == [str(tmp_path / "model.ts")]
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    net, cat = load_checkpoint(trained / "models" / "model.pt")
    for task in cat:
        ids, mod = net.request([task.id])
        x = torch.rand(1, task.num_channels, 48, 48, 48, generator=torch.Generator().manual_seed(task.id))
        with torch.no_grad():
            eager = net(x, ids, mod)
            torch.testing.assert_close(ts(x, ids, mod), eager, rtol=1e-4, atol=1e-4)
        assert eager.shape[1] == task.num_classes  # the targets plus the null padding channel

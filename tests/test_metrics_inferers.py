"""Per-task Dice, task-aware sliding-window inference, engine glue and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import task_dict, tiny_plan
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from torch import nn

from uniseg_components import checkpoints
from uniseg_components.checkpoints import CheckpointMeta, save_checkpoint
from uniseg_components.engines import PrepareTaskBatch
from uniseg_components.handlers import GradientClipHandler
from uniseg_components.inferers import MirroredPredictor, TaskSlidingWindowInferer, merge_task_labels
from uniseg_components.losses import TaskDiceCELoss
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.metrics import TaskDice, TaskDiceAggregator, case_dice, format_dice_table, mean_over_classes
from uniseg_components.tasks import TaskCatalog

pytestmark = pytest.mark.usefixtures("single_thread")


_task = task_dict
TINY_PLAN = tiny_plan((4, 8, 8))


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog(
        [_task("organs", 0, ["background", "liver", "kidney"]), _task("lesion", 1, ["background", "lesion"])],
        name="tiny",
        plan=TINY_PLAN,
    )


@pytest.fixture(scope="module")
def tiny_net(catalog) -> UniSeg:
    torch.manual_seed(0)
    return UniSeg.from_catalog(catalog).eval()


# ----------------------------------------------------------------------------- case_dice
def test_case_dice_known_overlap():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    pred = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 0, :4] = 1  # 4 voxels of class 1
    pred[0, 0, 0, 2:4] = 1  # 2 of them predicted ...
    pred[0, 1, 0, :2] = 1  # ... plus 2 false positives: Dice 2*2/(4+4) = 0.5
    label[0, 3, :3, 0] = 2  # class 2: 3 voxels, predicted exactly
    pred[0, 3, :3, 0] = 2
    label[0, 2, 0, 0] = 3  # class 3: 1 voxel GT, 1 right + 2 wrong predicted: 2*1/(1+3) = 0.5
    pred[0, 2, 0, 0:3] = 3
    d = case_dice(pred, label, num_classes=4)
    assert d.shape == (3,)
    assert d.tolist() == pytest.approx([0.5, 1.0, 0.5])


def test_case_dice_empty_cases():
    empty = torch.zeros(6, 6, 6, dtype=torch.long)
    some = empty.clone()
    some[1:3, 1:3, 1:3] = 1
    assert case_dice(empty, empty, 2).tolist() == [1.0]  # empty pred, empty GT
    assert case_dice(some, empty, 2).tolist() == [0.0]  # nonempty pred, empty GT
    assert case_dice(empty, some, 2).tolist() == [0.0]  # empty pred, nonempty GT
    assert case_dice(some, some, 2).tolist() == [1.0]
    # one class empty in both, the other perfect
    assert case_dice(some, some, 3).tolist() == [1.0, 1.0]


def test_case_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        case_dice(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 2), 2)


# ----------------------------------------------------------------------------- aggregation
def _half(shape=(1, 4, 4, 4), cls: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A case whose class ``cls`` has Dice 0.5 (4 GT voxels, 2 hit, 2 false positives)."""
    y = torch.zeros(shape, dtype=torch.long)
    p = torch.zeros(shape, dtype=torch.long)
    y[0, 0, 0, :4] = cls
    p[0, 0, 0, 2:4] = cls
    p[0, 1, 0, :2] = cls
    return p, y


def test_aggregator_per_task_and_mean(catalog):
    agg = TaskDiceAggregator(catalog)
    assert agg.mean() == 0.0 and agg.per_task() == {}
    # task 0 case 1: liver 0.5, kidney absent in both -> 1.0
    p, y = _half(cls=1)
    assert agg.add(p, y, 0).tolist() == pytest.approx([0.5, 1.0])
    # task 0 case 2: liver perfect, kidney 0.5
    p2, y2 = _half(cls=2)
    y2[0, 3, 3, 3] = 1
    p2[0, 3, 3, 3] = 1
    agg.add(p2, y2, torch.tensor(0))
    # task 1: one perfect case and one with a false positive on empty GT
    y3 = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    y3[0, :2, :2, :2] = 1
    agg.add(y3.clone(), y3, 1)
    agg.add(y3.clone(), torch.zeros_like(y3), "1")
    per = agg.per_task()
    assert per == {
        "organs": {"liver": pytest.approx(0.75), "kidney": pytest.approx(0.75)},
        "lesion": {"lesion": pytest.approx(0.5)},
    }
    assert agg.mean() == pytest.approx((0.75 + 0.5) / 2)  # tasks weigh equally, not cases
    assert agg.rows().shape == (6, 3)
    agg.reset()
    assert agg.rows().shape == (0, 3) and agg.mean() == 0.0


def test_format_dice_table():
    details = {"organs": {"liver": 0.75, "kidney": 0.25}, "lesion": {"lesion": 0.9}}
    text = format_dice_table(details, title="my title")
    assert text.splitlines()[0] == "my title"
    for word in ("organs", "liver", "kidney", "lesion", "(task mean)", "mean over tasks"):
        assert word in text
    assert "0.5000" in text  # organs mean
    assert "0.7000" in text  # mean over tasks (0.5 + 0.9) / 2
    tasks_line, classes_line = text.splitlines()[-2:]
    assert tasks_line.startswith("mean over tasks") and tasks_line.endswith("0.7000")
    # the papers' average: every class counts once, (0.75 + 0.25 + 0.9) / 3
    assert classes_line.startswith("mean over classes") and classes_line.endswith("0.6333")
    assert mean_over_classes(details) == pytest.approx(1.9 / 3) and mean_over_classes({}) == 0.0
    assert "mean over tasks" not in format_dice_table({})


def test_task_dice_ignite_metric(catalog):
    p, y = _half(cls=1)  # organs: liver 0.5, kidney 1.0 -> task mean 0.75
    perfect = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    perfect[0, 1:3, 1:3, 1:3] = 1
    onehot = torch.cat([1 - perfect, perfect]).float()  # probabilities/one-hot are argmaxed
    batches = [
        {"pred": [p], "label": [y], "task_id": [torch.tensor(0)]},
        {"pred": [onehot, perfect.clone()], "label": [perfect, perfect], "task_id": [torch.tensor([1]), 1]},
    ]
    engine = Engine(lambda e, batch: batch)
    metric = TaskDice(catalog)
    metric.attach(engine, "dice")
    engine.run(batches, max_epochs=1)
    assert engine.state.metrics["dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert metric.details == {
        "organs": {"liver": pytest.approx(0.5), "kidney": pytest.approx(1.0)},
        "lesion": {"lesion": pytest.approx(1.0)},
    }
    assert engine.state.metric_details["dice"] == metric.details
    # a second run starts from scratch
    engine.run([batches[0]], max_epochs=1)
    assert engine.state.metrics["dice"] == pytest.approx(0.75)


def test_task_dice_batched_tensors(catalog):
    metric = TaskDice(catalog)
    p, y = _half(cls=1)
    metric.update((torch.stack([p, y]), torch.stack([y, y]), torch.tensor([0, 0])))
    assert metric.compute() == pytest.approx((0.75 + 1.0) / 2)


# ----------------------------------------------------------------------------- sliding window
class RecordingNet(nn.Module):
    """Returns ``k`` copies of its input as logits and records every call."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.calls: list[tuple[tuple[int, ...], dict]] = []

    def forward(self, x: torch.Tensor, task_id: int = -1) -> torch.Tensor:
        self.calls.append((tuple(x.shape), {"task_id": task_id}))
        return x.repeat(1, self.k, *([1] * (x.ndim - 2)))


def test_sliding_window_passes_task_id():
    net = RecordingNet(k=3)
    image = torch.rand(1, 1, 20, 16, 12)
    inferer = TaskSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, mode="constant")
    out = inferer(image, net, task_id=3)
    assert out.shape == (1, 3, 20, 16, 12)
    assert len(net.calls) > 1
    assert all(kw == {"task_id": 3} for _, kw in net.calls)
    assert all(shape[2:] == (8, 8, 8) for shape, _ in net.calls)
    # an identity-like network is stitched back to the input
    assert torch.allclose(out, image.repeat(1, 3, 1, 1, 1), atol=1e-6)


def test_sliding_window_gaussian_default():
    inferer = TaskSlidingWindowInferer(roi_size=(8, 8, 8))
    assert inferer.overlap == 0.5 and inferer.mode == "gaussian" and inferer.mirror_axes == ()
    image = torch.rand(1, 1, 20, 16, 12)
    out = inferer(image, RecordingNet(k=2), task_id=0)
    assert out.shape == (1, 2, 20, 16, 12)
    assert torch.allclose(out, image.repeat(1, 2, 1, 1, 1), atol=1e-5)


class PointwiseNet(nn.Module):
    """Flip-equivariant: a voxel-wise function."""

    def forward(self, x: torch.Tensor, task_id: int = 0) -> torch.Tensor:
        return torch.cat([x.square() + task_id, torch.sin(x)], dim=1)


class RampNet(nn.Module):
    """Not flip-equivariant: adds a ramp along every spatial axis (weighted differently per axis)."""

    def forward(self, x: torch.Tensor, task_id: int = 0) -> torch.Tensor:
        out = x.clone()
        for a, w in zip(range(2, x.ndim), (1.0, 10.0, 100.0)):
            shape = [1] * x.ndim
            shape[a] = x.shape[a]
            out = out + w * torch.arange(x.shape[a], dtype=x.dtype).reshape(shape)
        return torch.cat([out, out * x + task_id], dim=1)


def test_mirroring_equivariant_network_unchanged():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 8, 8, 8)
    plain = TaskSlidingWindowInferer(roi_size=(8, 8, 8), mode="constant")
    mirrored = TaskSlidingWindowInferer(roi_size=(8, 8, 8), mode="constant", mirror_axes=(0, 1, 2))
    a = plain(image, PointwiseNet(), task_id=2)
    b = mirrored(image, PointwiseNet(), task_id=2)
    assert torch.allclose(a, b, atol=1e-6)


def test_mirroring_averages_non_equivariant_network():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 8, 6, 4)
    net = RampNet()
    axes = (0, 2)
    inferer = TaskSlidingWindowInferer(roi_size=(8, 6, 4), mode="constant", mirror_axes=axes)
    out = inferer(image, net, task_id=1)
    manual = torch.zeros_like(out)
    for dims in ([], [2], [4], [2, 4]):
        flipped = torch.flip(image, dims) if dims else image
        o = net(flipped, task_id=1)
        manual += (torch.flip(o, dims) if dims else o) / 4
    assert torch.allclose(out, manual, atol=1e-5)
    assert not torch.allclose(out, net(image, task_id=1), atol=1e-3)
    # the ramp along the non-mirrored axis survives, the mirrored ones average to a constant
    assert torch.allclose(out[0, 0] - image[0, 0], manual[0, 0] - image[0, 0], atol=1e-5)
    ramp = out[0, 0] - image[0, 0]
    assert torch.allclose(ramp[:, :, 0], ramp[:, :, 3], atol=1e-5)  # z (mirrored) flat
    assert not torch.allclose(ramp[:, 0, :], ramp[:, 5, :], atol=1e-3)  # y (not mirrored) not flat


def test_mirrored_predictor_tuple_output_and_bad_axes():
    net = RampNet()
    x = torch.randn(1, 1, 4, 4, 4)
    pred = MirroredPredictor(lambda t: (net(t), net(t) * 2), mirror_axes=(1,))
    a, b = pred(x)
    assert torch.allclose(b, 2 * a, atol=1e-5)
    with pytest.raises(ValueError, match="mirror_axes"):
        MirroredPredictor(net, mirror_axes=(3,))(x)


def test_all_tasks_matches_single_task_inference(tiny_net, catalog):
    torch.manual_seed(0)
    image = torch.randn(1, 1, 24, 16, 20)
    inferer = TaskSlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2)
    with torch.no_grad():
        outs = inferer.all_tasks(image, tiny_net)
        assert isinstance(outs, list) and len(outs) == len(catalog)
        for t, o in zip(catalog, outs):
            assert o.shape == (1, t.num_classes, 24, 16, 20)
            assert torch.allclose(o, inferer(image, tiny_net, task_id=t.id), atol=1e-5)
        sub = inferer.all_tasks(image, tiny_net, task_ids=[1, 0])
    assert [o.shape[1] for o in sub] == [2, 3]
    assert torch.allclose(sub[0], outs[1], atol=1e-5) and torch.allclose(sub[1], outs[0], atol=1e-5)
    with pytest.raises(ValueError, match="forward_all_tasks"):
        inferer.all_tasks(image, RecordingNet())


def test_all_tasks_single_task_id(tiny_net):
    # one requested task must still give a list of one (B, K, *spatial) tensor
    torch.manual_seed(0)
    image = torch.randn(2, 1, 16, 16, 16)
    inferer = TaskSlidingWindowInferer(roi_size=(16, 16, 16))
    with torch.no_grad():
        sub = inferer.all_tasks(image, tiny_net, task_ids=[1])
        single = inferer(image, tiny_net, task_id=1)
    assert isinstance(sub, list) and len(sub) == 1
    assert sub[0].shape == (2, 2, 16, 16, 16)
    assert torch.allclose(sub[0], single, atol=1e-5)


def test_all_tasks_with_mirroring(tiny_net):
    torch.manual_seed(0)
    image = torch.randn(1, 1, 16, 16, 16)
    inferer = TaskSlidingWindowInferer(roi_size=(16, 16, 16), mirror_axes=(0,))
    with torch.no_grad():
        outs = inferer.all_tasks(image, tiny_net)
        single = inferer(image, tiny_net, task_id=0)
    assert torch.allclose(outs[0], single, atol=1e-5)


# ----------------------------------------------------------------------------- merged label map
def test_merge_task_labels(catalog):
    organs, lesion = catalog[0], catalog[1]
    assert (organs.label_offset, lesion.label_offset) == (0, 2)
    a = torch.tensor([[0, 1, 2, 1, 0]])
    b = torch.tensor([[0, 0, 1, 1, 1]])
    merged = merge_task_labels([a, b], [organs, lesion])
    assert merged.tolist() == [[0, 1, 3, 3, 3]]  # lesion (1 + 2) wins where it overlaps
    merged_rev = merge_task_labels([b, a], [lesion, organs])
    assert merged_rev.tolist() == [[0, 1, 2, 1, 3]]  # now organs win
    with pytest.raises(ValueError, match="one label map per task"):
        merge_task_labels([a], [organs, lesion])
    with pytest.raises(ValueError, match="shape"):
        merge_task_labels([a, b[:, :3]], [organs, lesion])


def test_merge_task_labels_uniseg11():
    cat = TaskCatalog.builtin("uniseg_11tasks")
    maps = [torch.full((2, 2), t.num_classes - 1) for t in cat]
    maps[0][0, 0] = 1
    merged = merge_task_labels(maps[:1], [cat["liver"]])
    assert merged.tolist() == [[1, 2], [2, 2]]
    merged = merge_task_labels([maps[0], maps[9]], [cat["liver"], cat["brats"]])
    assert merged.unique().tolist() == [16]  # BraTS enhancing = 13 + 3


# ----------------------------------------------------------------------------- engines
def test_prepare_task_batch():
    prep = PrepareTaskBatch()
    image, label = torch.rand(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4)
    out = prep({"image": image, "label": label, "task_id": torch.tensor([2, 2])}, device="cpu")
    assert out[0] is image or torch.equal(out[0], image)
    assert torch.equal(out[1], label)
    assert out[2] == () and out[3] == {"task_id": 2}
    assert isinstance(out[3]["task_id"], int)
    no_label = prep({"image": image, "task_id": [1]})
    assert no_label[1] is None and no_label[3] == {"task_id": 1}
    with pytest.raises(ValueError, match=r"mixes tasks \[0, 1\]"):
        prep({"image": image, "label": label, "task_id": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="task_id.*AttachTaskd"):
        prep({"image": image, "label": label})
    custom = PrepareTaskBatch(image_key="img", label_key="seg", task_key="t")
    assert custom({"img": image, "seg": label, "t": torch.tensor(5)})[3] == {"task_id": 5}


class _FakeEngine:
    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.amp = False
        self.handlers: list = []

    def add_event_handler(self, event, handler) -> None:
        self.handlers.append((event, handler))


def _grad_norm(net: nn.Module) -> float:
    return float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None])))


def test_gradient_clip_handler_fake_engine():
    torch.manual_seed(0)
    net = nn.Linear(10, 3)
    (100 * net(torch.randn(4, 10)).square().sum()).backward()
    assert _grad_norm(net) > 1.0
    engine = _FakeEngine(net)
    handler = GradientClipHandler(max_norm=1.0)
    handler.attach(engine)
    assert len(engine.handlers) == 1 and engine.handlers[0][1] is handler
    handler(engine)
    assert _grad_norm(net) == pytest.approx(1.0, rel=1e-4)
    # below the limit nothing changes
    before = [p.grad.clone() for p in net.parameters()]
    GradientClipHandler(max_norm=10.0)(engine)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipHandler(0)


def test_gradient_clip_handler_supervised_trainer(catalog):
    from monai.engines.utils import IterationEvents

    torch.manual_seed(0)
    net = UniSeg.from_catalog(catalog).train()
    batch = {
        "image": torch.randn(2, 1, 16, 16, 16),
        "label": torch.randint(0, 3, (2, 1, 16, 16, 16)).float(),
        "task_id": torch.tensor([0, 0]),
    }
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=TaskDiceCELoss(),
        prepare_batch=PrepareTaskBatch(),
        amp=False,
    )
    norms: dict[str, float] = {}
    seen_task: list = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: norms.setdefault("before", _grad_norm(net)))
    GradientClipHandler(max_norm=1e-3).attach(trainer)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: norms.setdefault("after", _grad_norm(net)))
    orig_forward = net.forward
    net.forward = lambda x, task_id: (seen_task.append(task_id), orig_forward(x, task_id))[1]
    trainer.run()
    assert seen_task == [0]
    assert norms["before"] > 1e-2
    assert norms["after"] == pytest.approx(1e-3, rel=1e-3)


def test_checkpoint_meta_round_trip(tiny_net, catalog):
    meta = CheckpointMeta(tiny_net, catalog)
    state = meta.state_dict()
    assert state["network"] == tiny_net.config and state["catalog"] == catalog.to_dict()
    assert isinstance(state["uniseg_components"], str)
    restored = CheckpointMeta()
    assert restored.network_config is None and restored.catalog is None
    restored.load_state_dict(state)
    assert restored.network_config == tiny_net.config
    assert restored.catalog == catalog
    assert CheckpointMeta(tiny_net.config).network_config == tiny_net.config
    assert CheckpointMeta().state_dict()["catalog"] is None


def _save_manual(path, net, catalog) -> None:
    torch.save({"model": net.state_dict(), "meta": CheckpointMeta(net, catalog).state_dict()}, path)


def test_load_checkpoint_rebuilds_equal_network(tmp_path, tiny_net, catalog):
    path = tmp_path / "ckpt.pt"
    _save_manual(path, tiny_net, catalog)
    obj = torch.load(path, weights_only=True)  # plain data only
    assert set(obj) == {"model", "meta"}
    net, cat = checkpoints.load_checkpoint(path)
    assert isinstance(net, UniSeg) and not net.training
    assert cat == catalog
    assert net.config == tiny_net.config
    sd_a, sd_b = net.state_dict(), tiny_net.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x, task_id=1), tiny_net(x, task_id=1))


def test_save_checkpoint_and_catalog_override(tmp_path, tiny_net, catalog):
    path = save_checkpoint(tmp_path / "dir" / "model.pt", tiny_net, catalog, epoch=3)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    obj = torch.load(path, weights_only=True)
    assert obj["epoch"] == 3
    other = TaskCatalog([_task("a", 0, ["bg", "x", "y"]), _task("b", 1, ["bg", "z"])], name="other")
    net, cat = checkpoints.load_checkpoint(path, catalog=other)
    assert cat is other and isinstance(net, UniSeg)
    wrong = TaskCatalog([_task("a", 0, ["bg", "x"])], name="one")
    with pytest.raises(ValueError, match="2 tasks but the catalog has 1"):
        checkpoints.load_checkpoint(path, catalog=wrong)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoints.load_checkpoint(path)


def test_load_checkpoint_truncated_file(tmp_path, tiny_net, catalog):
    good = tmp_path / "good.pt"
    _save_manual(good, tiny_net, catalog)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt.*could not be read"):
        checkpoints.load_checkpoint(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        checkpoints.load_checkpoint(garbage)


def test_load_checkpoint_without_meta(tmp_path, tiny_net):
    path = tmp_path / "bare.pt"
    torch.save({"model": tiny_net.state_dict()}, path)
    with pytest.raises(ValueError, match="bare.pt.*'meta'"):
        checkpoints.load_checkpoint(path)
    path2 = tmp_path / "state_dict_only.pt"
    torch.save(tiny_net.state_dict(), path2)
    with pytest.raises(ValueError, match="state_dict_only.pt"):
        checkpoints.load_checkpoint(path2)


def test_load_checkpoint_weights_do_not_fit(tmp_path, tiny_net, catalog):
    path = tmp_path / "mismatch.pt"
    sd = dict(tiny_net.state_dict())
    sd.pop("prompt")
    torch.save({"model": sd, "meta": CheckpointMeta(tiny_net, catalog).state_dict()}, path)
    with pytest.raises(ValueError, match="mismatch.pt.*do not fit"):
        checkpoints.load_checkpoint(path)


# ----------------------------------------------------------------------------- per-task windows (2D and 3D tasks)
def _mixed_catalog() -> TaskCatalog:
    t3 = _task("organs", 0, ["background", "liver", "kidney"])
    t2 = dict(_task("us", 1, ["background", "head"]), dims=2, modalities=["US"], spacing=[1.0, 1.0], patch_size=[8, 12])
    return TaskCatalog([t3, t2], name="mixed", plan=TINY_PLAN)


def test_sliding_window_uses_each_tasks_patch_and_rank():
    cat = _mixed_catalog()
    net = RecordingNet(k=2)
    inferer = TaskSlidingWindowInferer(roi_size=(16, 16, 16), catalog=cat, mode="constant", mirror_axes=(0, 1, 2))
    img2d = torch.rand(1, 1, 20, 18)
    out2d = inferer(img2d, net, task_id=1)
    assert out2d.shape == (1, 2, 20, 18)
    assert {shape[2:] for shape, _ in net.calls} == {(8, 12)}  # the 2D task's patch; mirroring on x and y only
    assert torch.allclose(out2d, img2d.repeat(1, 2, 1, 1), atol=1e-6)
    net.calls.clear()
    out3d = inferer(torch.rand(1, 1, 20, 16, 12), net, task_id=torch.tensor([0]))
    assert out3d.shape == (1, 2, 20, 16, 12)
    assert {shape[2:] for shape, _ in net.calls} == {(16, 16, 16)}
    assert inferer.roi_size == (16, 16, 16)  # the bound window is unchanged
    # without a catalog a 2D input cannot use a 3D window: a clear error instead of MONAI's
    with pytest.raises(ValueError, match="does not fit a 2D input"):
        TaskSlidingWindowInferer(roi_size=(16, 16, 16))(img2d, net, task_id=1)
    with pytest.raises(ValueError, match="task 'us'"):
        inferer(torch.rand(1, 1, 20, 16, 12), net, task_id=1)


def test_merged_tasks_inferer_2d_with_catalog():
    from uniseg_components.inferers import MergedTasksInferer

    cat = _mixed_catalog()

    class Stub(nn.Module):
        def forward_all_tasks(self, x, task_ids):
            assert x.shape[2:] == (8, 12)
            return [torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1) for _ in task_ids]

    merged = MergedTasksInferer((16, 16, 16), tasks=[cat["us"]], catalog=cat)(torch.rand(1, 1, 16, 12), Stub())
    assert merged.shape == (1, 1, 16, 12) and merged.unique().tolist() == [float(cat["us"].label_offset + 1)]


def test_evaluator_runs_2d_and_3d_tasks_in_one_run():
    """One TaskEvaluator run over a 2D and a 3D item with MedUniSeg: per-task windows, per-task Dice for both."""
    from monai.data import DataLoader

    from uniseg_components.engines import TaskEvaluator
    from uniseg_components.methods.meduniseg import MedUniSeg

    cat = _mixed_catalog()
    torch.manual_seed(0)
    net = MedUniSeg.from_catalog(cat).eval()
    items = [
        {"image": torch.rand(1, 24, 16, 20), "label": torch.zeros(1, 24, 16, 20), "task_id": 0},
        {"image": torch.rand(1, 16, 24), "label": torch.ones(1, 16, 24), "task_id": 1},
    ]
    seen: list[tuple[int, ...]] = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, task_id):
            seen.append(tuple(x.shape[2:]))
            return self.net(x, task_id)

    evaluator = TaskEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(items, batch_size=1),
        network=Recording(),
        inferer=TaskSlidingWindowInferer(roi_size=(16, 16, 16), catalog=cat),
        postprocessing=lambda d: {**d, "pred": d["pred"].argmax(0, keepdim=True)},
        key_val_metric={"val_mean_dice": TaskDice(cat)},
    )
    evaluator.run()
    assert set(seen) == {(16, 16, 16), (8, 12)}
    details = evaluator.state.metric_details["val_mean_dice"]
    assert set(details) == {"organs", "us"}
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0


def test_image_stem_strips_the_image_extension():
    from uniseg_components.io import image_stem

    assert image_stem("/data/case_001.nii.gz") == "case_001"
    assert image_stem(Path("x.y.nii")) == "x.y"
    assert image_stem("scan.mha") == "scan" and image_stem("vol.nrrd") == "vol"
    assert image_stem("noext") == "noext"

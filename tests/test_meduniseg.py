"""MedUniSeg (2D and 3D in one model, modal prompts + MMap, task prompt + FUSE) and MedUniSeg* (relearning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_prediction, task_dict
from torch import nn

from uniseg_components.checkpoints import build_network, load_checkpoint, save_checkpoint
from uniseg_components.losses import TaskDiceCELoss
from uniseg_components.methods.meduniseg import MedUniSeg, MedUniSegStar, relearn
from uniseg_components.methods.meduniseg.network import twin_tensors
from uniseg_components.networks import UNetBackbone, plan_from_catalog
from uniseg_components.tasks import TaskCatalog

pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _task(name, i, dims, modalities, labels, patch):
    return task_dict(name, i, labels, dims=dims, modalities=modalities, patch=patch)


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog.from_dict(
        {
            "name": "tiny_2d3d",
            "plan": {
                "patch_size": [16, 16, 16],
                "features": [4, 8, 16],
                "kernel_sizes": [[3, 3, 3]] * 3,
                "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                "n_conv_per_stage": 1,
                "n_conv_per_stage_decoder": 1,
            },
            "tasks": [
                _task("organ_ct", 0, 3, ["CT"], ["background", "organ", "tumour"], [16, 16, 16]),
                _task("lesion_petct", 1, 3, ["CT", "PET"], ["background", "lesion"], [16, 16, 16]),
                _task("head_us", 2, 2, ["US"], ["background", "head"], [24, 24]),
                _task("skin_rgb", 3, 2, ["Dermoscopy"] * 3, ["background", "lesion"], [24, 24]),
            ],
        }
    )


def tiny(catalog: TaskCatalog, **kw) -> MedUniSeg:
    torch.manual_seed(0)
    return MedUniSeg.from_catalog(catalog, **kw)


# ----------------------------------------------------------------------------- shapes and the 2D path
def test_2d_and_3d_shapes_eval_and_deep_supervision(catalog):
    net = tiny(catalog).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 16, 16), 0).shape == (2, 3, 16, 16, 16)
        assert net(torch.randn(1, 2, 16, 16, 32), 1).shape == (1, 2, 16, 16, 32)
        assert net(torch.randn(2, 1, 24, 24), 2).shape == (2, 2, 24, 24)
        assert net(torch.randn(1, 3, 40, 32), 3).shape == (1, 2, 40, 32)
    net.train()
    out = net(torch.randn(2, 1, 24, 24), 2)
    assert [tuple(o.shape) for o in out] == [(2, 2, 24, 24), (2, 2, 12, 12)]
    out3 = net(torch.randn(2, 1, 16, 16, 16), 0)
    assert [tuple(o.shape) for o in out3] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]


def test_2d_twin_operations_equal_3d_operations_on_a_depth_1_volume():
    """The 2D path's rule: a 3D conv (same padding, any stride) on a depth-1 volume is the 2D conv with the central
    depth slice of the kernel; a transposed conv whose two output slices are averaged is the 2D transposed conv
    with the mean of the depth taps."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, 3, stride=(2, 2, 2), padding=1)
    conv2 = nn.Conv2d(3, 5, 3, stride=2, padding=1).to("meta")
    up = nn.ConvTranspose3d(6, 4, 2, 2, bias=False)
    up2 = nn.ConvTranspose2d(6, 4, 2, 2, bias=False).to("meta")
    x, h = torch.randn(2, 3, 12, 10), torch.randn(2, 6, 5, 7)
    w = twin_tensors(conv, conv2)
    torch.testing.assert_close(
        F.conv2d(x, w["weight"], w["bias"], 2, 1), conv(x.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5
    )
    wu = twin_tensors(up, up2)
    torch.testing.assert_close(
        F.conv_transpose2d(h, wu["weight"], None, 2), up(h.unsqueeze(-1)).mean(-1), rtol=1e-5, atol=1e-5
    )


def test_2d_and_3d_batches_update_the_same_weights(catalog):
    net = tiny(catalog).train()
    loss_fn = TaskDiceCELoss()
    shared = {
        "stage-1 conv": net.backbone.encoder[1][0].conv.weight,
        "bottleneck conv": net.backbone.encoder[2][0].conv.weight,
        "first transposed conv": net.backbone.upsamples[0].weight,
        "last decoder conv": net.backbone.decoder[-1][0].conv.weight,
        "FUSE": net.fuse[0][0].conv.weight,
        "task prompt": net.prompt,
    }
    grads = {}
    for task, x in ((2, torch.randn(2, 1, 24, 24)), (0, torch.randn(2, 1, 16, 16, 16))):
        net.zero_grad()
        y = torch.randint(0, catalog[task].num_classes, (x.shape[0], 1, *x.shape[2:])).float()
        loss_fn(net(x, task), y).backward()
        grads[task] = {k: p.grad.clone() for k, p in shared.items()}
    for k in shared:
        assert grads[2][k].abs().sum() > 0, f"2D batch gives no gradient to {k}"
        assert grads[0][k].abs().sum() > 0, f"3D batch gives no gradient to {k}"
    # the depth taps of the transposed conv get the same gradient from a 2D batch (it uses their mean), and a
    # 3x3x3 conv only its central depth slice
    g = grads[2]["first transposed conv"]
    torch.testing.assert_close(g[..., 0], g[..., 1])
    g = grads[2]["bottleneck conv"]
    assert g[..., 1].abs().sum() > 0 and g[..., 0].abs().sum() == 0 and g[..., 2].abs().sum() == 0


def test_alternating_2d_and_3d_training_lowers_both_losses(catalog):
    """Alternate 2D and 3D batches (one task each) on a learnable toy problem: both losses go down."""
    net = tiny(catalog).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = TaskDiceCELoss()
    g = torch.Generator().manual_seed(1)

    def batch(task):
        shape = (2, *catalog[task].patch_size)
        label = (torch.rand(2, 1, *catalog[task].patch_size, generator=g) > 0.6).float()
        x = label.repeat(1, catalog[task].num_channels, *([1] * len(shape[1:]))) * 2 - 1
        x = x + 0.3 * torch.randn(x.shape, generator=g)
        return x, label

    first, last = {}, {}
    for step in range(24):
        task = 2 if step % 2 == 0 else 1  # 2D US, then 3D PET/CT
        x, y = batch(task)
        loss = loss_fn(net(x, task), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first.setdefault(task, loss.item())
        last[task] = loss.item()
    assert last[2] < 0.8 * first[2] and last[1] < 0.8 * first[1], (first, last)


# ----------------------------------------------------------------------------- prompts and priors
def test_modal_prompts_mix_per_channel_and_condition_the_output(catalog):
    net = tiny(catalog).eval()
    assert net.modalities == ["CT", "PET", "US", "Dermoscopy"]
    assert net.modal_prompts.shape == (4, 8, 4, 4, 4)
    assert net.modal_mix[1].tolist() == [0.5, 0.5, 0.0, 0.0]  # PET/CT: mean of the CT and PET prompts
    assert net.modal_mix[3].tolist() == [0.0, 0.0, 0.0, 1.0]  # RGB: three Dermoscopy channels
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x, 0)
        net.modal_prompts[0].add_(1.0)  # the CT prompt: no effect while MMap is the identity (fresh model)
        assert torch.equal(net(x, 0), before)
        nn.init.normal_(net.mmap.out.weight, std=0.5)
        gated = net(x, 0)
        net.modal_prompts[0].add_(1.0)
        assert not torch.allclose(net(x, 0), gated)  # now the modal prior conditions the features


def test_task_prompt_conditions_the_decoder(catalog):
    net = tiny(catalog).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        a = net(x, 0)[:, :2]
        net.prompt[0, 0].add_(3.0)
        b = net(x, 0)[:, :2]
    assert not torch.allclose(a, b)


def test_forward_all_tasks_equals_separate_passes(catalog):
    net = tiny(catalog).eval()
    nn.init.normal_(net.mmap.out.weight, std=0.3)
    x3 = torch.randn(1, 1, 16, 16, 16)
    x2 = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        (only,) = net.forward_all_tasks(x3)  # default: the 1-channel 3D tasks
        torch.testing.assert_close(only, net(x3, 0))
        (us,) = net.forward_all_tasks(x2)
        torch.testing.assert_close(us, net(x2, 2))
        # tasks of different modalities: one encoder pass per modal prompt
        outs = net.forward_all_tasks(torch.randn(1, 2, 16, 16, 16), [1, 1])
        assert [o.shape[1] for o in outs] == [2, 2]


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(catalog):
    net = tiny(catalog).eval()
    with pytest.raises(ValueError, match="task 0 is 3D but the input is 2D"):
        net(torch.randn(1, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="task 2 is 2D but the input is 3D"):
        net(torch.randn(1, 1, 16, 16, 16), 2)
    with pytest.raises(ValueError, match="out of range"):
        net(torch.randn(1, 1, 16, 16, 16), 7)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 4, 16, 16, 16), 0)
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 1, 18, 24), 2)
    with pytest.raises(ValueError, match=r"expects \(B, C, X, Y\) 2D"):
        net(torch.randn(16, 16), 2)
    with pytest.raises(ValueError, match="same task"):
        net(torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown"):
        MedUniSeg(net.plan, [2], [["Sonar"]])
    bad = catalog.to_dict()
    bad["tasks"][2]["patch_size"] = [22, 24]
    with pytest.raises(ValueError, match="in-plane total stride"):
        MedUniSeg.from_catalog(TaskCatalog.from_dict(bad))


# ----------------------------------------------------------------------------- checkpoints and the paper's claim
def test_config_round_trip_and_checkpoint(catalog, tmp_path):
    net = tiny(catalog, modal_prompt_channels=4, modal_grid=[2, 2, 2]).eval()
    copy = build_network(json.loads(json.dumps(net.config)))
    assert isinstance(copy, MedUniSeg) and copy.config == net.config
    copy.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(copy.eval()(x, 3), net(x, 3))
    path = save_checkpoint(tmp_path / "model.pt", net, catalog)
    loaded, cat = load_checkpoint(path)
    assert isinstance(loaded, MedUniSeg) and cat.names == catalog.names
    with torch.no_grad():
        assert torch.equal(loaded(x, 3), net(x, 3))


def test_meduniseg_17tasks_is_under_a_tenth_of_17_nnunets():
    cat = TaskCatalog.builtin("meduniseg_17tasks")
    assert len(cat) == 17 and cat.dims == [2, 3]
    net = MedUniSeg.from_catalog(cat)
    plan = plan_from_catalog(cat)
    # one nnU-Net of the same plan per task, with that task's input channels and classes
    singles = sum(n_params(UNetBackbone(plan, (t.num_channels,), t.num_classes)) for t in cat)
    total = n_params(net)
    assert total < singles / 10, (total, singles)
    assert 30e6 < total < 34e6  # the UniSeg backbone plus prompts, MMap and FUSE
    assert net.prompt.shape == (1, 17, 6, 6, 4)
    with torch.no_grad():  # a 2D task of the catalog runs at its own patch
        t2 = next(t for t in cat if t.dims == 2)
        assert t2.patch_size[0] % plan.total_stride[0] == 0


# ----------------------------------------------------------------------------- MedUniSeg*
def _toy(task, catalog, g, n=2):
    size = catalog[task].patch_size
    label = (torch.rand(n, 1, *size, generator=g) > 0.6).float()
    x = label.repeat(1, catalog[task].num_channels, *([1] * len(size))) * 2 - 1
    return x + 0.3 * torch.randn(x.shape, generator=g), label


def test_relearning_trains_only_adapters_and_leaves_other_tasks_bitwise_unchanged(catalog):
    base = tiny(catalog).eval()
    g = torch.Generator().manual_seed(3)
    probes = {t: _toy(t, catalog, g, 1)[0] for t in range(len(catalog))}
    with torch.no_grad():
        before = {t: base(x, t) for t, x in probes.items()}
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    star = MedUniSegStar(base, tasks=[2])
    assert all(not p.requires_grad for p in star.base.parameters())
    assert set(map(id, star.trainable_parameters())) == set(map(id, star.adapters.parameters()))
    with torch.no_grad():  # fresh adapters start at zero: nothing changes yet
        assert torch.equal(star.eval()(probes[2], 2), before[2])
    opt = torch.optim.Adam(star.trainable_parameters(), lr=1e-2)
    loss_fn = TaskDiceCELoss()
    star.train()
    losses = []
    for _ in range(15):
        x, y = _toy(2, catalog, g)
        loss = loss_fn(star(x, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    star.eval()
    for k, v in star.base.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"
    with torch.no_grad():
        for t, x in probes.items():
            if t == 2:
                assert not torch.equal(star(x, t), before[t])
            else:
                assert torch.equal(star(x, t), before[t]), f"task {t} changed"
        all_out = star.forward_all_tasks(torch.randn(1, 1, 24, 24))
        assert len(all_out) == 1 and all_out[0].shape == (1, 2, 24, 24)


def test_relearn_checkpoint_round_trip_and_task_selection(catalog, tmp_path):
    base = tiny(catalog).eval()
    up = save_checkpoint(tmp_path / "model.pt", base, catalog)
    dice = {"mean": 0.5, "per_task": {"organ_ct": {"organ": 0.8, "tumour": 0.6}, "head_us": {"head": 0.2}}}
    (tmp_path / "dice.json").write_text(json.dumps(dice))
    assert relearn.read_dice(tmp_path / "dice.json") == {"organ_ct": pytest.approx(0.7), "head_us": 0.2}
    assert relearn.select_tasks(catalog, dice=tmp_path / "dice.json", threshold=0.5) == ["head_us"]
    assert relearn.select_tasks(catalog, tasks="skin_rgb,0") == ["organ_ct", "skin_rgb"]
    with pytest.raises(ValueError, match="nothing to relearn"):
        relearn.select_tasks(catalog, dice=dice, threshold=0.1)
    with pytest.raises(ValueError, match="needs task names"):
        relearn.select_tasks(catalog)
    with pytest.raises(KeyError, match="nope"):
        relearn.select_tasks(catalog, tasks=["nope"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        relearn.read_dice(tmp_path / "missing.json")

    star = relearn.relearn_network(up, ["head_us"])
    assert isinstance(star, MedUniSegStar) and star.relearn_tasks == [2] and star.training
    with torch.no_grad():
        nn.init.normal_(star.adapters["2"][-1].up.weight, std=0.1)
    path = save_checkpoint(tmp_path / "relearn.pt", star, catalog)
    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded, MedUniSegStar) and loaded.relearn_tasks == [2]
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x, 2), star.eval()(x, 2))
    # relearning again keeps the adapters of the first round and adds new ones
    again = relearn.relearn_network(path, ["organ_ct"])
    assert again.relearn_tasks == [0, 2]
    with torch.no_grad():
        assert torch.equal(again.eval()(x, 2), star(x, 2))
    from uniseg_components.methods.uniseg import UniSeg

    uni = UniSeg.from_catalog(catalog.select(dims=3))
    p = save_checkpoint(tmp_path / "uniseg.pt", uni, catalog.select(dims=3))
    with pytest.raises(ValueError, match="relearns MedUniSeg checkpoints"):
        relearn.relearn_network(p, [0])


# ----------------------------------------------------------------------------- export
def test_torchscript_and_onnx_export_of_a_relearned_model_match_eager(catalog, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from uniseg_components.export import export_checkpoint

    base = tiny(catalog).eval()
    with torch.no_grad():
        nn.init.normal_(base.mmap.out.weight, std=0.3)
    star = MedUniSegStar(base, [2])
    with torch.no_grad():
        nn.init.normal_(star.adapters["2"][0].up.weight, std=0.3)
    star.eval()
    written = export_checkpoint(save_checkpoint(tmp_path / "m.pt", star, catalog), tmp_path / "out")
    assert sorted(written) == ["onnx_c1_16x16x16", "onnx_c1_24x24", "onnx_c2_16x16x16", "onnx_c3_24x24", "torchscript"]
    ts = torch.jit.load(str(written["torchscript"]))
    inputs = {0: torch.randn(1, 1, 16, 16, 16), 1: torch.randn(1, 2, 16, 16, 16), 2: torch.randn(1, 1, 24, 24)}
    inputs[3] = torch.randn(1, 3, 24, 24)
    for task, x in inputs.items():
        with torch.no_grad():
            eager = star(x, task)
            out = ts(x, torch.tensor([task]))
        k = catalog[task].num_classes
        assert out.shape == (1, max(catalog.num_classes), *x.shape[2:])
        assert torch.equal(out[:, :k], eager), f"TorchScript differs from eager for task {task}"
        assert bool((out[:, k:] == torch.finfo(out.dtype).min).all())
        name = f"onnx_c{x.shape[1]}_{'x'.join(map(str, x.shape[2:]))}"
        sess = ort.InferenceSession(str(written[name]))
        got = sess.run(None, {"image": x.numpy(), "task_id": np.array([task], dtype=np.int64)})[0]
        np.testing.assert_allclose(got[:, :k], eager.numpy(), atol=1e-4)
    with pytest.raises(Exception, match="do not match the patch"):
        ts(torch.randn(1, 1, 32, 32), torch.tensor([2]))


def test_infer_and_save_a_2d_rgb_file(catalog, tmp_path):
    """An RGB 2D file stored as (X, Y, 1, 3) (the nnU-Net layout) gets a (X, Y) label map with its in-plane affine,
    through the CLI's ``infer`` (the MedUniSeg bundle's inference config), equal to the step-by-step reference."""
    import nibabel as nib
    import numpy as np

    from uniseg_components import cli

    affine = np.diag([0.2, 0.3, 1.0, 1.0])
    affine[:2, 3] = [4.0, -6.0]
    rgb = np.random.default_rng(0).uniform(0, 255, (30, 28, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(rgb, affine), tmp_path / "skin.nii.gz")
    net = tiny(catalog)
    ckpt = save_checkpoint(tmp_path / "m.pt", net, catalog)
    (path,) = cli.infer(str(ckpt), str(tmp_path / "skin.nii.gz"), task="skin_rgb", out=str(tmp_path / "out"))
    assert Path(path).name == "skin_skin_rgb.nii.gz"
    label = reference_prediction(net, catalog, str(tmp_path / "skin.nii.gz"), "skin_rgb")
    assert label.shape == (1, 30, 28) and set(torch.unique(label).tolist()) <= {0, 1}
    out = nib.load(path)
    assert out.shape == (30, 28) and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine[:2, :2], affine[:2, :2], atol=1e-6)
    np.testing.assert_allclose(out.affine[:2, 3], affine[:2, 3], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj), label[0].numpy())


def test_mmap_gate_equals_the_autograd_expression_with_fewer_full_resolution_ops():
    """MMap's hand-written gate backward: outputs and every gradient (features, prompt, MMap's parameters) equal
    those of autograd on ``features * (1 + tanh(a))`` and ``mean(a)`` (float64 round-off), also when only one of
    the two outputs is used, and it runs fewer full-resolution operations."""
    from uniseg_components.benchmark import step_op_counts
    from uniseg_components.methods.meduniseg.network import MMap

    torch.manual_seed(0)
    mmap = MMap(3, 8, 4, 3).double()
    nn.init.normal_(mmap.out.weight, std=0.5)  # a trained gate: not the identity of a fresh MMap
    f = torch.randn(2, 8, 6, 6, 4, dtype=torch.double, requires_grad=True)
    p = torch.randn(2, 4, 6, 6, 4, dtype=torch.double, requires_grad=True)
    g_out, g_prior = torch.randn(2, 8, 6, 6, 4, dtype=torch.double), torch.randn(2, 8, dtype=torch.double)
    tensors = [f, p, *mmap.parameters()]

    def reference():
        a = mmap.out(mmap.block(torch.cat([f, p], dim=1)))
        return f * (1 + torch.tanh(a)), a.mean(dim=(2, 3, 4))

    for use_out, use_prior in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):
        grads = []
        for outputs in (mmap(f, p), reference()):
            loss = use_out * (outputs[0] * g_out).sum() + use_prior * (outputs[1] * g_prior).sum()
            grads.append(torch.autograd.grad(loss, tensors))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out, prior = mmap(f, p)
    ref_out, ref_prior = reference()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prior, ref_prior, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mmap(f, p)[0], ref_out, rtol=1e-12, atol=1e-12)

    def step(fn):
        return lambda: sum(o.sum() for o in fn()).backward()

    ours, ref = step_op_counts(step(lambda: mmap(f, p)), (6, 6, 4)), step_op_counts(step(reference), (6, 6, 4))
    assert ours["full_res_ops"] < ref["full_res_ops"] and ours["full_res_gb"] < ref["full_res_gb"]
    with pytest.raises(RuntimeError, match="no second derivative"):  # rather than a silently wrong one
        torch.autograd.grad(mmap(f, p)[0].sum(), f, create_graph=True)


def test_twin_tensors_follow_the_source_weights(catalog):
    """The 2D twin's tensors are worked out once per (network, twin) and then read from the current weights: a
    change to the 3D network shows in the next call."""
    net = MedUniSeg.from_catalog(catalog).eval()
    twin = net.flat_twin()
    first = twin_tensors(net, twin)
    name = next(k for k in first if k.endswith("conv.weight") and net.get_parameter(k).ndim == 5)
    with torch.no_grad():
        net.get_parameter(name).add_(1.0)
    second = twin_tensors(net, twin)
    assert set(first) == set(second)
    w = net.get_parameter(name)
    torch.testing.assert_close(second[name], w.select(-1, w.shape[-1] // 2))
    other = MedUniSeg.from_catalog(catalog, features=(4, 8, 32)).eval()  # other shapes: the recipe is worked out again
    with pytest.raises(ValueError, match="cannot map the 3D shape"):
        twin_tensors(other, twin)

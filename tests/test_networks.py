"""UniSeg and the plan-driven backbone: sizes from the paper, shapes, errors, and that the prompt conditions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_PLAN
from torch import nn

from uniseg_components.losses import TaskDiceCELoss
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.networks import FusePromptModule, UNetBackbone, UNetPlan, auto_plan, plan_from_catalog
from uniseg_components.tasks import TaskCatalog


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_uniseg(num_classes=(3, 2), in_channels=(1,), **plan_kw) -> UniSeg:
    torch.manual_seed(0)
    return UniSeg(UNetPlan.from_dict({**TINY_PLAN, **plan_kw}), list(num_classes), in_channels)


# ----------------------------------------------------------------------------- the paper's model (no forward)
@pytest.fixture(scope="module")
def uniseg11() -> TaskCatalog:
    return TaskCatalog.builtin("uniseg_11tasks")


@pytest.fixture(scope="module")
def big_uniseg(uniseg11) -> UniSeg:
    return UniSeg.from_catalog(uniseg11)


@pytest.fixture(scope="module")
def big_backbone(uniseg11) -> UNetBackbone:
    return UNetBackbone(plan_from_catalog(uniseg11), in_channels=(1,), out_channels=2)


def test_uniseg11_parameter_count(big_uniseg):
    n = n_params(big_uniseg)
    assert abs(n - 32_114_381) <= 0.01 * 32_114_381
    assert n == 32_114_381


def test_plain_backbone_parameter_count(big_backbone):
    n = n_params(big_backbone)
    assert abs(n - 31_167_584) <= 0.01 * 31_167_584
    assert n == 31_167_584


def test_uniseg11_prompt_shape(big_uniseg):
    # MONAI order (x, y, z): patch (192, 192, 64), total stride (32, 32, 16)
    assert big_uniseg.plan.total_stride == (32, 32, 16)
    assert tuple(big_uniseg.prompt.shape) == (1, 11, 6, 6, 4)
    assert big_uniseg.prompt.numel() == 1584


def test_uniseg11_fuse(big_uniseg):
    assert n_params(big_uniseg.fuse) == 939_261
    convs = [m for m in big_uniseg.fuse.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(331, 82), (82, 82), (82, 11)]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) and c.bias is not None for c in convs)
    # every block, the last included, has InstanceNorm + LeakyReLU
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in big_uniseg.fuse.modules()) == 3
    assert sum(isinstance(m, nn.LeakyReLU) for m in big_uniseg.fuse.modules()) == 3
    # FusePromptModule on its own gives the same size
    assert n_params(FusePromptModule(3, 320, 11)) == 939_261
    assert n_params(FusePromptModule(3, 320, 17)) == 993_939


def test_uniseg11_decoder_and_heads(big_uniseg, big_backbone):
    up0 = big_uniseg.backbone.upsamples[0]
    assert isinstance(up0, nn.ConvTranspose3d)
    assert (up0.in_channels, up0.out_channels) == (321, 320)
    assert up0.kernel_size == up0.stride == (2, 2, 2) and up0.bias is None
    assert big_backbone.upsamples[0].in_channels == 320  # no prompt channel without UniSeg
    heads = big_uniseg.backbone.heads
    assert len(heads) == 5
    assert [h.in_channels for h in heads] == [320, 256, 128, 64, 32]
    assert all(h.out_channels == 4 and h.bias is None and h.kernel_size == (1, 1, 1) for h in heads)
    # one stem per channel count, stage 0 kernel 3x3x1 in (x, y, z)
    assert sorted(big_uniseg.backbone.stems) == ["1", "2", "4"]
    assert all(s.kernel_size == (3, 3, 1) and s.out_channels == 32 for s in big_uniseg.backbone.stems.values())
    assert big_uniseg.num_classes == [3, 3, 3, 3, 2, 2, 2, 2, 2, 4, 2]


# ----------------------------------------------------------------------------- small forward tests
@pytest.fixture(scope="module")
def demo3() -> TaskCatalog:
    return TaskCatalog.builtin("demo").select(dims=3)


@pytest.fixture(scope="module")
def demo_net(demo3) -> UniSeg:
    torch.manual_seed(0)
    return UniSeg.from_catalog(demo3, patch_size=(16, 16, 16))


def test_demo_plan(demo3):
    net = UniSeg.from_catalog(demo3)
    assert net.plan.patch_size == (48, 48, 48) and net.plan.features == (8, 16, 32, 64)
    assert tuple(net.prompt.shape) == (1, 3, 6, 6, 6)
    assert net.num_classes == [3, 4, 2] and net.backbone.in_channels == (1, 2)


def test_eval_output_shape_per_task(demo_net, demo3):
    demo_net.eval()
    with torch.no_grad():
        for task in demo3:
            x = torch.randn(2, task.num_channels, 16, 16, 16)
            out = demo_net(x, task_id=task.id)
            assert isinstance(out, torch.Tensor)
            assert out.shape == (2, task.num_classes, 16, 16, 16)
            assert torch.isfinite(out).all()


def test_eval_output_shape_on_demo_patch(demo3):
    torch.manual_seed(0)
    net = UniSeg.from_catalog(demo3).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 2, 48, 48, 48), task_id=2)
    assert out.shape == (1, 2, 48, 48, 48)


def test_training_deep_supervision_outputs(demo_net):
    demo_net.train()
    out = demo_net(torch.randn(2, 1, 16, 16, 16), task_id=1)
    assert isinstance(out, list) and len(out) == 3
    assert [tuple(o.shape) for o in out] == [(2, 4, 16, 16, 16), (2, 4, 8, 8, 8), (2, 4, 4, 4, 4)]
    demo_net.eval()


def test_no_deep_supervision_plan_returns_tensor_in_training(demo3):
    net = UniSeg.from_catalog(demo3, patch_size=(16, 16, 16), deep_supervision=False).train()
    out = net(torch.randn(1, 1, 16, 16, 16), task_id=0)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 16, 16, 16)


def test_forward_all_tasks_equals_separate_forward(demo_net):
    demo_net.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        all_out = demo_net.forward_all_tasks(x)
        assert len(all_out) == 3
        for t, o in enumerate(all_out):
            assert torch.allclose(o, demo_net(x, task_id=t), atol=1e-5)
        sub = demo_net.forward_all_tasks(x, task_ids=[1, 0])
    assert [o.shape[1] for o in sub] == [4, 3]
    assert torch.allclose(sub[0], all_out[1], atol=1e-5)
    # different tasks give different outputs on the same input (the prompt matters)
    assert not torch.allclose(all_out[0][:, :2], all_out[2], atol=1e-3)


def test_forward_all_tasks_training_mode(demo_net):
    demo_net.train()
    torch.manual_seed(2)
    x = torch.randn(1, 1, 16, 16, 16)
    outs = demo_net.forward_all_tasks(x, task_ids=[0, 2])
    single = demo_net(x, task_id=2)
    demo_net.eval()
    assert isinstance(outs[1], list) and len(outs[1]) == 3
    for a, b in zip(outs[1], single):
        assert torch.allclose(a, b, atol=1e-5)


def test_patch_size_changes_prompt_shape(demo3):
    net = UniSeg.from_catalog(demo3, patch_size=(32, 16, 24))
    assert net.plan.patch_size == (32, 16, 24)
    assert tuple(net.prompt.shape) == (1, 3, 4, 2, 3)


def test_other_divisible_input_size(demo_net):
    demo_net.eval()
    with torch.no_grad():
        out = demo_net(torch.randn(1, 1, 32, 24, 8), task_id=0)
    assert out.shape == (1, 3, 32, 24, 8)
    assert torch.isfinite(out).all()
    # the prompt parameter itself keeps its training shape
    assert tuple(demo_net.prompt.shape) == (1, 3, 2, 2, 2)


def test_non_divisible_patch_raises(demo3):
    with pytest.raises(ValueError, match="divisible"):
        UniSeg.from_catalog(demo3, patch_size=(20, 16, 16))


def test_non_divisible_input_raises(demo_net):
    with pytest.raises(ValueError, match="divisible"):
        demo_net(torch.randn(1, 1, 20, 16, 16), task_id=0)


def test_wrong_channel_count_raises(demo_net):
    with pytest.raises(ValueError, match=r"3 channel\(s\).*\[1, 2\]"):
        demo_net(torch.randn(1, 3, 16, 16, 16), task_id=0)


def test_2d_input_to_3d_model_raises(demo_net):
    with pytest.raises(ValueError, match="3D"):
        demo_net(torch.randn(1, 1, 16, 16), task_id=0)


def test_catalog_with_2d_task_raises():
    demo = TaskCatalog.builtin("demo")
    with pytest.raises(ValueError, match="fetal_us"):
        UniSeg.from_catalog(demo)


def test_task_ids(demo_net):
    demo_net.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="same task"):
        demo_net(x, task_id=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        demo_net(x, task_id=3)
    with pytest.raises(ValueError, match="out of range"):
        demo_net(x, task_id=-1)
    with pytest.raises(ValueError, match="out of range"):
        demo_net.forward_all_tasks(x, task_ids=[0, 5])
    with torch.no_grad():
        a = demo_net(x, task_id=torch.tensor([1, 1]))
        b = demo_net(x, task_id=1)
        c = demo_net(x, task_id=torch.tensor(1))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_config_round_trip(demo_net):
    demo_net.eval()
    cfg = json.loads(json.dumps(demo_net.config))  # the config is plain JSON
    assert cfg["name"] == "UniSeg" and cfg["num_classes"] == [3, 4, 2] and cfg["in_channels"] == [1, 2]
    torch.manual_seed(123)  # different init
    net2 = UniSeg.from_config(cfg).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net2(x, task_id=2), demo_net(x, task_id=2))
        net2.load_state_dict(demo_net.state_dict())
        assert torch.equal(net2(x, task_id=2), demo_net(x, task_id=2))
    assert net2.plan == demo_net.plan


def test_gradients_reach_prompt_and_fuse():
    net = tiny_uniseg(num_classes=(3, 2, 2)).train()
    torch.manual_seed(0)
    out = net(torch.randn(2, 1, 16, 16, 16), task_id=1)
    assert isinstance(out, list) and out[0].shape == (2, 2, 16, 16, 16)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    assert net.prompt.grad is not None and net.prompt.grad.abs().sum() > 0
    for p in net.fuse.parameters():
        assert p.grad is not None
    last = net.fuse[-1].conv.weight.grad  # (T, hidden, 3, 3, 3)
    # only the selected task's FUSE output channel is used
    assert last[1].abs().sum() > 0
    assert last[0].abs().sum() == 0 and last[2].abs().sum() == 0
    # shared heads: only the first K=2 of max(num_classes)=3 output channels get gradients
    head = net.backbone.heads[0].weight.grad
    assert head[:2].abs().sum() > 0 and head[2].abs().sum() == 0


def test_auto_plan_anisotropic():
    plan = auto_plan((64, 64, 32), spacing=(1.0, 1.0, 3.0))
    assert plan.strides[0] == (1, 1, 1)
    assert plan.strides[1] == (2, 2, 1)  # z is 3x coarser: not downsampled at the first stage
    assert plan.kernel_sizes[0] == (3, 3, 1)
    assert all(st[2] == 2 for st in plan.strides[2:])  # z downsampled once the others caught up
    assert plan.features[0] == 32 and max(plan.features) <= 320
    assert all(p % t == 0 for p, t in zip(plan.patch_size, plan.total_stride))
    assert all(p // t >= 4 for p, t in zip(plan.patch_size, plan.total_stride))
    iso = auto_plan((64, 64, 32))
    assert iso.strides[1] == (2, 2, 2) and iso.kernel_sizes[0] == (3, 3, 3)
    assert iso.total_stride == (16, 16, 8)
    # the patch is rounded down to a multiple of the total stride
    assert auto_plan((70, 64, 32)).patch_size[0] == 64


def test_plan_from_catalog_without_plan_uses_auto_plan():
    cat = TaskCatalog(
        [
            {
                "name": "a",
                "id": 0,
                "dims": 3,
                "modalities": ["CT"],
                "labels": ["bg", "x"],
                "spacing": [1.0, 1.0, 3.0],
                "patch_size": [32, 32, 16],
            }
        ]
    )
    plan = plan_from_catalog(cat, base_features=4, max_features=16)
    assert plan.strides[1] == (2, 2, 1)
    assert plan.features[0] == 4 and max(plan.features) == 16
    net = UniSeg.from_catalog(cat, base_features=4, max_features=16).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 16), task_id=0).shape == (1, 2, 32, 32, 16)


def test_plan_validation():
    with pytest.raises(ValueError, match="divisible"):
        UNetPlan.from_dict({**TINY_PLAN, "patch_size": [12, 16, 16]})
    with pytest.raises(ValueError, match="one entry per stage"):
        UNetPlan.from_dict({**TINY_PLAN, "strides": [[1, 1, 1], [2, 2, 2]]})
    with pytest.raises(ValueError, match="odd"):
        UNetPlan.from_dict({**TINY_PLAN, "kernel_sizes": [[3, 3, 2]] * 4})
    with pytest.raises(ValueError, match="unknown field"):
        UNetPlan.from_dict({**TINY_PLAN, "depth": 3})
    plan = UNetPlan.from_dict(TINY_PLAN)
    assert UNetPlan.from_dict(plan.to_dict()) == plan


def test_backbone_2d():
    plan = auto_plan((32, 32), base_features=4, max_features=16, max_stages=3)
    assert plan.spatial_dims == 2 and plan.strides == ((1, 1), (2, 2), (2, 2))
    torch.manual_seed(0)
    net = UNetBackbone(plan, in_channels=(1, 3), out_channels=3)
    assert isinstance(net.upsamples[0], nn.ConvTranspose2d)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
        assert net(torch.randn(1, 1, 64, 32)).shape == (1, 3, 64, 32)
    net.train()
    out = net(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32), (2, 3, 16, 16)]
    with pytest.raises(ValueError, match="2D"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match=r"2 channel\(s\).*\[1, 3\]"):
        net(torch.randn(1, 2, 32, 32))


def test_backbone_extra_tensor_checks():
    plan = UNetPlan.from_dict(TINY_PLAN)
    net = UNetBackbone(plan, out_channels=2, decoder_extra_channels=1).eval()
    skips = net.encode(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(s.shape[1:]) for s in skips][-1] == (16, 2, 2, 2)
    with pytest.raises(ValueError, match="extra"):
        net.decode(skips)
    out = net.decode(skips, torch.zeros(1, 1, 2, 2, 2))
    assert out.shape == (1, 2, 16, 16, 16)


# ----------------------------------------------------------------------------- training: the prompt conditions
def _cubes_batch(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with one bright and one dark cube each on a noisy background; masks of both."""
    x = 0.2 * torch.randn(n, 1, size, size, size, generator=gen)
    bright = torch.zeros(n, 1, size, size, size)
    dark = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        for mask, value in ((bright, 1.0), (dark, -1.0)):
            s = int(torch.randint(4, 7, (1,), generator=gen))
            lo = torch.randint(0, size - s + 1, (3,), generator=gen).tolist()
            sl = (i, 0, slice(lo[0], lo[0] + s), slice(lo[1], lo[1] + s), slice(lo[2], lo[2] + s))
            mask[sl] = 1.0
        x[i, 0][dark[i, 0] > 0] = -1.0 + 0.2 * torch.randn(int(dark[i].sum()), generator=gen)
        x[i, 0][bright[i, 0] > 0] = 1.0 + 0.2 * torch.randn(int(bright[i].sum()), generator=gen)
        overlap = (bright[i] > 0) & (dark[i] > 0)
        bright[i][overlap] = 0.0  # the dark cube was painted last where they overlap
    return x, bright, dark


def _dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    inter = (pred * gt).sum()
    return float(2 * inter / (pred.sum() + gt.sum()).clamp_min(1e-6))


def test_training_two_tasks_prompt_conditions_output():
    # Task 0 segments the bright cube, task 1 the dark cube, on the same images: only the prompt can tell the
    # network which one to output. The bottleneck is kept at 8^3 voxels: FUSE ends with InstanceNorm, so the
    # task prompt is a zero-mean spatial pattern, which carries a task signal poorly on a 2^3 bottleneck.
    torch.manual_seed(0)
    plan = UNetPlan.from_dict(
        {
            "patch_size": [16, 16, 16],
            "features": [8, 16],
            "kernel_sizes": [[3, 3, 3]] * 2,
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": 1,
            "n_conv_per_stage_decoder": 1,
        }
    )
    net = UniSeg(plan, [2, 2], (1,))
    loss_fn = TaskDiceCELoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for step in range(80):
        task = step % 2
        x, bright, dark = _cubes_batch(2, 16, gen)
        target = bright if task == 0 else dark
        opt.zero_grad()
        loss = loss_fn(net(x, task_id=task), target)
        loss.backward()
        opt.step()

    net.eval()
    x, bright, dark = _cubes_batch(8, 16, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        p0 = net(x, task_id=0).argmax(1, keepdim=True).float()
        p1 = net(x, task_id=1).argmax(1, keepdim=True).float()
    d_bright, d_dark = _dice(p0, bright), _dice(p1, dark)
    # chance (predicting everything foreground) is ~0.1 here
    chance = max(_dice(torch.ones_like(bright), bright), _dice(torch.ones_like(dark), dark))
    assert chance < 0.2
    assert d_bright > 0.8, d_bright
    assert d_dark > 0.8, d_dark
    # same images, different task: the outputs differ (task 0 does not find the dark cubes)
    assert _dice(p0, dark) < 0.2
    assert _dice(p1, bright) < 0.2


# ----------------------------------------------------------------------------- GPU-speed rewrites: same values
@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_act_is_bitwise_monai_adn_with_fewer_full_resolution_ops(dims):
    """InstanceNormAct's training pass (batch norm of the (1, B*C, ...) view, activation in place before the view)
    gives exactly MONAI's ADN "NA" values and gradients, and skips autograd's CopySlices detour: fewer operations at
    full resolution and fewer bytes moved in forward + backward."""
    from monai.networks.blocks import ADN

    from uniseg_components.benchmark import step_op_counts
    from uniseg_components.networks.blocks import InstanceNormAct

    torch.manual_seed(0)
    ours = InstanceNormAct(dims, 6, negative_slope=0.02)
    ref = ADN(
        ordering="NA",
        in_channels=6,
        norm=("instance", {"affine": True, "eps": 1e-5}),
        norm_dim=dims,
        act=("leakyrelu", {"negative_slope": 0.02, "inplace": True}),
    )
    with torch.no_grad():
        ours.N.weight.uniform_(0.5, 1.5)
        ours.N.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    size = (12, 10, 8)[:dims]
    x = torch.randn(2, 6, *size)
    grad = torch.randn(2, 6, *size)

    def run(module):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(grad)
        return out.detach(), xi.grad, module.N.weight.grad, module.N.bias.grad

    for a, b in zip(run(ours), run(ref)):
        assert torch.equal(a, b)
    with torch.no_grad():  # no gradient: ADN's own forward
        assert torch.equal(ours(x), ref(x))
    x_full = x
    x = x_full.to(torch.bfloat16)  # a bf16 input under autocast (what a conv hands over): the same kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(run(ours), run(ref)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    if dims == 3:  # channels-last inputs (the CPU bundles' layout), batch of 1 and of 2
        for batch in (1, 2):
            x = x_full[:batch].contiguous(memory_format=torch.channels_last_3d)
            grad_batch = grad
            grad = grad_batch[:batch]
            for a, b in zip(run(ours), run(ref)):
                assert torch.equal(a, b)
            grad = grad_batch
    x = x_full

    def step(module):
        xi = x.clone().requires_grad_()
        return lambda: module(xi).backward(grad)

    fast, slow = step_op_counts(step(ours), size), step_op_counts(step(ref), size)
    assert fast["full_res_ops"] < slow["full_res_ops"] and fast["full_res_gb"] < slow["full_res_gb"]
    assert torch.equal(torch.jit.script(ours)(x), ref(x))  # export scripts the plain form
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        ours(torch.randn(2, 6, *([1] * dims), requires_grad=True))


def test_decode_head_channels_equals_slicing_the_full_heads():
    """backbone.decode(head_channels=k): the first k channels of every head's output (deep supervision included)
    with the same gradients, computed from the first k rows of the head weights."""
    torch.manual_seed(0)
    net = UNetBackbone(UNetPlan.from_dict(TINY_PLAN), (1,), 4).train()
    x = torch.randn(2, 1, 16, 16, 16)
    full = net.decode(net.encode(x))
    part = net.decode(net.encode(x), head_channels=2)
    assert isinstance(part, list) and len(part) == len(full)
    for a, b in zip(part, full):
        assert a.shape[1] == 2
        torch.testing.assert_close(a, b[:, :2], rtol=1e-5, atol=1e-6)
    g_part = torch.autograd.grad(sum(o.square().sum() for o in part), list(net.parameters()), allow_unused=True)
    g_full = torch.autograd.grad(sum(o[:, :2].square().sum() for o in full), list(net.parameters()), allow_unused=True)
    scale = max(float(b.abs().max()) for b in g_full if b is not None)
    for a, b in zip(g_part, g_full):  # conv biases before InstanceNorm: zero up to round-off, hence the scale
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="head_channels must be in 1..4"):
        net.decode(net.encode(x), head_channels=5)

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes: request and outputs, partial-label loss, mixed-task batches, incremental tasks, inference and export."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from conftest import task_dict, tiny_plan

from uniseg_components.checkpoints import build_network, save_checkpoint
from uniseg_components.data import TaskBalancedBatchSampler
from uniseg_components.engines import PrepareTaskBatch
from uniseg_components.export import export_torchscript
from uniseg_components.handlers import EMAHandler
from uniseg_components.methods.hermes import (
    Hermes,
    HermesLoss,
    HermesMergedInferer,
    TargetsToLabeld,
    TwoWayAttentionBlock,
    default_fusion_stages,
    hermes_tables,
    targets_to_label,
)
from uniseg_components.methods.hermes.incremental import extend_checkpoint, extend_network, param_groups
from uniseg_components.optimizers import WarmupPolyLR, lamb
from uniseg_components.tasks import TaskCatalog

pytestmark = pytest.mark.usefixtures("single_thread")
PLAN = tiny_plan((8, 16, 16, 16))


def task(name, tid, modalities, labels, patch=(16, 16, 16), dims=3):
    return task_dict(name, tid, ["background", *labels], dims=dims, modalities=modalities, patch=patch[:dims])


def make_catalog(tasks, name="hermes_test"):
    return TaskCatalog.from_dict({"name": name, "plan": PLAN, "tasks": tasks})


TASKS = [
    task("organs_ct", 0, ["CT"], ["liver", "spleen"]),
    task("lesion_ct", 1, ["CT"], ["lesion"]),
    task("brain_t1", 2, ["T1"], ["csf", "grey", "white"]),
    task("lesion_petct", 3, ["CT", "PET"], ["lesion"]),
]


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return make_catalog(TASKS)


def tiny(catalog, seed=0, **kw) -> Hermes:
    """The default fusion stages with one block each (the paper's block counts are checked on their own)."""
    torch.manual_seed(seed)
    kw.setdefault("blocks_per_stage", None if "fusion_stages" in kw else [1] * 5)
    return Hermes.from_catalog(catalog, modality_tokens=2, **kw)


# ----------------------------------------------------------------------------- tables, request, shapes
def test_tables_request_and_defaults(catalog):
    tasks, mods = hermes_tables(catalog)
    assert mods == ["CT", "T1", "CT+PET"]
    assert [(t["target_offset"], t["num_targets"], t["modality"]) for t in tasks] == [
        (0, 2, 0),
        (2, 1, 0),
        (3, 3, 1),
        (6, 1, 2),
    ]
    net = tiny(catalog)
    assert net.num_tasks == 4 and net.num_targets == 7 and net.modality_names == mods
    assert net.task_targets(2) == [3, 4, 5] and net.task_modality(3) == 2
    # target id + 1 is the catalog's merged label of that class
    names = catalog.merged_label_names()
    assert names[net.task_targets(2)[1] + 1] == "brain_t1/grey"
    ids, mod = net.request([0, 1, 2])
    assert ids.tolist() == [[0, 1, -1, -1], [2, -1, -1, -1], [3, 4, 5, -1]] and mod.tolist() == [0, 0, 1]
    assert default_fusion_stages(4) == (["enc1", "enc2", "enc3", "dec0", "dec1"], [2, 2, 4, 2, 2])
    assert default_fusion_stages(6)[0] == ["enc3", "enc4", "enc5", "dec0", "dec1"]
    assert net.fusion_stages == ["enc1", "enc2", "enc3", "dec0", "dec1"]
    paper = Hermes.from_catalog(catalog)
    assert paper.blocks_per_stage == [2, 2, 4, 2, 2] and paper.modality_tokens == 10
    assert [len(paper.fusion[s]) for s in paper.fusion_stages] == [2, 2, 4, 2, 2]
    assert paper.priors["enc3"].modalities["k_T1"].shape == (10, 16)
    # one parameter per task and per modality at every stage
    assert set(net.priors["enc3"].tasks.keys()) == {"k_organs_ct", "k_lesion_ct", "k_brain_t1", "k_lesion_petct"}
    assert net.priors["dec0"].modalities["k_CT_PET"].shape == (2, 16)


def test_shapes_eval_and_training(catalog):
    net = tiny(catalog).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert net(x, task_id=0).shape == (2, 2, 16, 16, 16)
        assert net(x, task_id=2).shape == (2, 3, 16, 16, 16)
        ids, mod = net.request([2])
        assert net(x, ids, mod).shape == (2, 4, 16, 16, 16)  # (1, n) request broadcast to the batch
        assert net(torch.randn(1, 2, 16, 16, 16), task_id=3).shape == (1, 1, 16, 16, 16)
        # a larger input divisible by the stride works too (sliding windows are the patch, volumes may differ)
        assert net(torch.randn(1, 1, 32, 16, 24), task_id=1).shape == (1, 1, 32, 16, 24)
    net.train()
    out = net(x, task_id=torch.tensor([0, 2]))
    assert set(out) == {"pred", "modality", "task_ids", "modality_id"}
    assert out["pred"].shape == (2, 4, 16, 16, 16) and out["modality"].shape == (2, 3)
    assert out["task_ids"].tolist() == [[0, 1, -1, -1], [3, 4, 5, -1]] and out["modality_id"].tolist() == [0, 1]


def test_mixed_batch_equals_separate_passes(catalog):
    """Padding tokens are masked: a sample's output does not depend on the other samples or the padding."""
    net = tiny(catalog).eval()
    # make the feature-side fusion active (it starts at zero)
    with torch.no_grad():
        for p in net.fusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        mixed = net(x, task_id=torch.tensor([2, 0]))
        a = net(x[:1], task_id=2)
        b = net(x[1:], task_id=0)
    assert mixed.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(mixed[:1], a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1:, :2], b, atol=1e-5, rtol=1e-4)
    assert bool((mixed[1, 2] == -1e4).all())  # sample 1 has 2 targets: its third channel is padding


def test_targets_overlap_and_fresh_fusion_is_identity(catalog):
    net = tiny(catalog).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        net.logit_bias.fill_(20.0)
        prob = torch.sigmoid(net(x, task_id=0))
    # one sigmoid per target, no softmax across targets: both masks may cover the same voxel
    assert bool(((prob[0, 0] > 0.5) & (prob[0, 1] > 0.5)).any())
    block = TwoWayAttentionBlock(16, 2)
    tokens, feats = torch.randn(2, 5, 16), torch.randn(2, 30, 16)
    t2, f2 = block(tokens, feats)
    assert torch.equal(f2, feats) and not torch.equal(t2, tokens)


def test_modality_head_and_loss_term(catalog):
    net = tiny(catalog).train()
    x = torch.randn(2, 1, 16, 16, 16)
    ids, mod = net.request([0, 2])
    out = net(x, ids, mod)
    y = torch.zeros(2, 1, 16, 16, 16)
    with_mod = HermesLoss(modality_weight=1.0)(out, y)
    without = HermesLoss(modality_weight=0.0)(out, y)
    ce = torch.nn.functional.cross_entropy(out["modality"], mod)
    torch.testing.assert_close(with_mod - without, ce)
    assert net.eval().modality_logits(x, ids, mod).shape == (2, 3) and not net.training


def test_errors(catalog):
    net = tiny(catalog).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    ids, mod = net.request([0])
    with pytest.raises(ValueError, match="unknown target id"):
        net(x, torch.tensor([[0, 7]]), mod)
    with pytest.raises(ValueError, match="unknown target id"):
        net(x, torch.tensor([[-2]]), mod)
    with pytest.raises(ValueError, match="modality_id"):
        net(x, ids, torch.tensor([3]))
    with pytest.raises(ValueError, match="out of range"):
        net(x, task_id=4)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 3, 16, 16, 16), task_id=0)
    with pytest.raises(ValueError, match="3D model"):
        net(torch.randn(1, 1, 16, 16), task_id=0)
    with pytest.raises(ValueError, match="task_ids"):
        net(x, ids)  # a request needs its modality too
    with torch.no_grad():  # the image alone: the default task's targets (MONAI's one-input tools, MONAI Label)
        assert torch.equal(net(x), net(x, task_id=net.default_task))
    with pytest.raises(ValueError, match="not both"):
        net(x, ids, mod, task_id=0)
    two_d = make_catalog([*TASKS, task("us", 4, ["US"], ["head"], dims=2)])
    with pytest.raises(ValueError, match=r"select\(dims=3\)"):
        Hermes.from_catalog(two_d)
    with pytest.raises(ValueError, match="fusion_stages"):
        Hermes.from_catalog(catalog, fusion_stages=["enc9"])
    with pytest.raises(ValueError, match="blocks_per_stage"):
        Hermes.from_catalog(catalog, fusion_stages=["enc3"], blocks_per_stage=[1, 2])
    out = tiny(catalog).train()(x, ids, mod)
    with pytest.raises(ValueError, match="label values"):
        HermesLoss()(out, torch.full((1, 1, 16, 16, 16), 3.0))
    with pytest.raises(ValueError, match="training output"):
        HermesLoss()(out["pred"], torch.zeros(1, 1, 16, 16, 16))


def test_config_round_trip_and_build_network(catalog):
    net = tiny(catalog, fusion_stages=["dec0", "enc3"], blocks_per_stage=[1, 3]).eval()
    assert net.fusion_stages == ["enc3", "dec0"] and net.blocks_per_stage == [3, 1]  # execution order
    cfg = net.config
    assert cfg["name"] == "Hermes" and cfg["modalities"] == ["CT", "T1", "CT+PET"]
    assert [t["name"] for t in cfg["tasks"]] == catalog.names
    again = build_network(cfg)
    assert isinstance(again, Hermes) and again.config == cfg
    again.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, task_id=2), net(x, task_id=2))


# ----------------------------------------------------------------------------- partial labels
def test_partial_label_gradients(catalog):
    """Sample 0 (organs_ct, 2 targets) and sample 1 (lesion_ct, 1 target) in one batch."""
    net = tiny(catalog).train()
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.zeros(2, 1, 16, 16, 16)
    y[0, 0, 2:8, 2:8, 2:8] = 1
    y[0, 0, 9:14, 9:14, 9:14] = 2
    y[1, 0, 4:10, 4:10, 4:10] = 1
    out = net(x, task_id=torch.tensor([0, 1]))
    assert out["task_ids"].tolist() == [[0, 1, -1], [2, -1, -1]]
    out["pred"].retain_grad()
    HermesLoss()(out, y).backward()
    grad = out["pred"].grad
    assert bool((grad[1, 1:] == 0).all()) and bool((grad[0, 2] == 0).all())  # padded channels
    assert bool((grad[1, 0] != 0).any()) and bool((grad[0, :2] != 0).all(dim=0).any())
    # the loss of sample 0 alone gives no gradient to lesion_ct's tokens (a target its data does not label)
    net.zero_grad()
    out = net(x[:1], task_id=0)
    HermesLoss()(out, y[:1]).backward()
    for stage in net.fusion_stages:
        tokens = net.priors[stage].tasks
        assert tokens["k_lesion_ct"].grad is None or not bool(tokens["k_lesion_ct"].grad.any())
        assert bool(tokens["k_organs_ct"].grad.abs().sum() > 0)


def synthetic_batch(gen: torch.Generator, b: int = 2):
    """A bright cube (target 1) and a dark sphere (target 2) on noise."""
    x = 0.3 * torch.randn(b, 1, 16, 16, 16, generator=gen)
    y = torch.zeros(b, 1, 16, 16, 16)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    for i in range(b):
        c = torch.randint(3, 8, (3,), generator=gen)
        y[i, 0, c[0] : c[0] + 5, c[1] : c[1] + 5, c[2] : c[2] + 5] = 1
        s = torch.randint(10, 13, (3,), generator=gen).float()
        ball = ((grid - s.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 6
        y[i, 0][ball] = 2
    x = x + (y == 1).float() * 2.0 - (y == 2).float() * 2.0
    return x, y


def test_loss_decreases_and_beats_background(catalog):
    net = tiny(catalog, seed=1).train()
    loss_fn = HermesLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        x, y = synthetic_batch(gen)
        loss = loss_fn(net(x, task_id=0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    x, y = synthetic_batch(torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = torch.sigmoid(net.eval()(x, task_id=0)) > 0.5
    for j in (0, 1):
        g = y[:, 0] == j + 1
        dice = 2 * (pred[:, j] & g).sum() / (pred[:, j].sum() + g.sum())
        assert float(dice) > 0.3  # all-background has Dice 0 on every target


# ----------------------------------------------------------------------------- the authors' training recipe
#: one sample, 10 voxels: targets of channel 0 at voxels 0-1, channel 1 at 2-5, channel 2 at 6-7; channel 3 is padding
RECIPE_LABEL = torch.tensor([[[1, 1, 2, 2, 2, 2, 3, 3, 0, 0]]])
#: probabilities per channel: FP >> FN (channel 0), FN >> FP (1), in between (2), padding (3)
RECIPE_PROB = torch.tensor(
    [[[0.9, 0.9] + [0.6] * 8, [0.02] * 2 + [0.1] * 4 + [0.02] * 4, [0.1] * 6 + [0.5] * 2 + [0.1] * 2, [0.7] * 10]],
    dtype=torch.float64,
)


def _recipe_output(prob: torch.Tensor = RECIPE_PROB) -> dict[str, torch.Tensor]:
    return {"pred": torch.logit(prob).requires_grad_(True), "task_ids": torch.tensor([[0, 1, 2, -1]])}


def _hand_counts(channel: int) -> tuple[float, float, float, list[float], list[float]]:
    """TP, FP, FN, probabilities and binary target of one channel of the recipe example, in plain Python."""
    p = RECIPE_PROB[0, channel].tolist()
    g = [1.0 if v == channel + 1 else 0.0 for v in RECIPE_LABEL[0, 0].tolist()]
    tp = sum(a * b for a, b in zip(p, g))
    fp = sum(a * (1 - b) for a, b in zip(p, g))
    fn = sum((1 - a) * b for a, b in zip(p, g))
    return tp, fp, fn, p, g


def test_adaptive_tversky_alpha_is_fp_over_fp_plus_fn_clamped():
    loss = HermesLoss()
    gt = torch.stack([(RECIPE_LABEL[0, 0] == j + 1).double() for j in range(4)])[None]
    alpha = loss.tversky_alpha(RECIPE_PROB, gt)[0]
    fp, fn = [_hand_counts(j)[1] for j in range(3)], [_hand_counts(j)[2] for j in range(3)]
    assert fp[0] / (fp[0] + fn[0]) > 0.9 and fp[1] / (fp[1] + fn[1]) < 0.1  # the example has both extremes
    assert alpha[0].item() == pytest.approx(0.8)  # FP >> FN: clamped at 0.8
    assert alpha[1].item() == pytest.approx(0.2)  # FN >> FP: clamped at 0.2
    assert alpha[2].item() == pytest.approx(fp[2] / (fp[2] + fn[2])) and 0.2 < alpha[2].item() < 0.8  # 0.8 / 1.8
    assert alpha[2].item() == pytest.approx(0.8 / 1.8)
    assert HermesLoss(alpha_range=(0.3, 0.6)).tversky_alpha(RECIPE_PROB, gt)[0, :2].tolist() == pytest.approx(
        [0.6, 0.3]
    )


def test_adaptive_tversky_loss_equals_hand_computation_and_ignores_padding():
    s = 1e-5
    expected = 0.0
    for j in range(3):
        tp, fp, fn, p, g = _hand_counts(j)
        a = min(0.8, max(0.2, fp / (fp + fn)))
        bce = -sum(b * math.log(q) + (1 - b) * math.log(1 - q) for q, b in zip(p, g)) / len(p)
        tversky = 1 - (2 * tp + s) / (2 * tp + 2 * a * fp + 2 * (1 - a) * fn + s)
        expected += (bce + tversky) / 3  # three valid channels; the padding channel has weight 0
    out = _recipe_output()
    value = HermesLoss(modality_weight=0.0, smooth=s)(out, RECIPE_LABEL)
    assert value.item() == pytest.approx(expected, rel=1e-6)  # the loss computes in float32
    value.backward()
    assert bool((out["pred"].grad[0, 3] == 0).all()) and bool((out["pred"].grad[0, :3] != 0).all())
    other = RECIPE_PROB.clone()
    other[0, 3] = 0.01  # anything in the padding channel
    assert HermesLoss(modality_weight=0.0, smooth=s)(_recipe_output(other), RECIPE_LABEL).item() == value.item()
    # plain Dice (the previous recipe), and the Tversky form at alpha = beta = 1/2 is exactly that Dice
    plain = 0.0
    for j in range(3):
        tp, _, _, p, g = _hand_counts(j)
        bce = -sum(b * math.log(q) + (1 - b) * math.log(1 - q) for q, b in zip(p, g)) / len(p)
        plain += (bce + 1 - (2 * tp + s) / (sum(p) + sum(g) + s)) / 3
    dice = HermesLoss(modality_weight=0.0, smooth=s, adaptive_tversky=False)(_recipe_output(), RECIPE_LABEL)
    assert dice.item() == pytest.approx(plain, rel=1e-6) and abs(dice.item() - value.item()) > 1e-3
    half = HermesLoss(modality_weight=0.0, smooth=s, alpha_range=(0.5, 0.5))(_recipe_output(), RECIPE_LABEL)
    assert half.item() == pytest.approx(dice.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha_range"):
        HermesLoss(alpha_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="adaptive_tversky must be True or False, got 'false'"):
        HermesLoss(adaptive_tversky="false")  # what `--adaptive_tversky false` passes: a truthy string


def test_adaptive_tversky_alpha_gradient_is_detached_by_default():
    """Detached: the gradient of the loss with alpha held at its value; not detached (the authors' code): alpha's own
    gradient is added, inside the clamp range only (channel 2)."""
    grads = {}
    for detach in (True, False):
        out = _recipe_output()
        loss = HermesLoss(modality_weight=0.0) if detach else HermesLoss(modality_weight=0.0, detach_alpha=False)
        loss(out, RECIPE_LABEL).backward()
        grads[detach] = out["pred"].grad[0].float()
    # reference: the same loss written out with the alphas as constants
    logits = torch.logit(RECIPE_PROB[0, :3]).float().requires_grad_(True)  # the loss computes in float32
    p = torch.sigmoid(logits)
    g = torch.stack([(RECIPE_LABEL[0, 0] == j + 1).float() for j in range(3)])
    alphas = torch.tensor(
        [min(0.8, max(0.2, _hand_counts(j)[1] / (_hand_counts(j)[1] + _hand_counts(j)[2]))) for j in range(3)]
    )
    tp, fp, fn = (p * g).sum(1), (p * (1 - g)).sum(1), ((1 - p) * g).sum(1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, g, reduction="none").mean(1)
    tv = 1 - (2 * tp + 1e-5) / (2 * tp + 2 * alphas * fp + 2 * (1 - alphas) * fn + 1e-5)
    ((bce + tv).sum() / 3).backward()
    torch.testing.assert_close(grads[True][:3], logits.grad)
    torch.testing.assert_close(grads[False][:2], grads[True][:2])  # clamped: the clamp passes no gradient
    assert (grads[False][2] - grads[True][2]).abs().max() > 1e-4


def _apex_fused_lamb_step(params, state, lr, betas, eps, weight_decay, max_grad_norm=1.0):
    """One step of apex's FusedLAMB (csrc/multi_tensor_lamb.cu, bias correction, adam_w_mode, grad averaging)."""
    b1, b2 = betas
    state["step"] = t = state.get("step", 0) + 1
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    clip = norm / max_grad_norm if norm > max_grad_norm else 1.0
    state["clipped"] = state.get("clipped", False) or bool(norm > max_grad_norm)
    for p in params:
        s = state.setdefault(id(p), {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        g = p.grad / clip
        s["m"].mul_(b1).add_(g, alpha=1 - b1)
        s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        update = (s["m"] / (1 - b1**t)) / ((s["v"] / (1 - b2**t)).sqrt() + eps) + weight_decay * p
        ratio = p.norm() / update.norm() if weight_decay != 0 and p.norm() > 0 and update.norm() > 0 else 1.0
        p.sub_(lr * ratio * update)


def _lamb_versus_apex(make_optimizer, steps: int = 30, eps: float = 1e-8) -> tuple[float, bool]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        net[2].weight.mul_(20)  # a tensor norm above 10 (pytorch_optimizer's default clamp)
    ref = copy.deepcopy(net)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    opt, state = make_optimizer(net.parameters(), eps), {}
    for _ in range(steps):
        for m in (net, ref):
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
        opt.step()
        with torch.no_grad():
            _apex_fused_lamb_step(list(ref.parameters()), state, 2e-3, (0.9, 0.999), eps, 1e-5)
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(net.parameters(), ref.parameters()))
    return diff, state["clipped"]


def test_lamb_matches_apex_fused_lamb():
    """The optimiser the bundle builds (create_optimizer("lamb"), the authors' lr, betas and weight decay) follows a
    re-implementation of apex's FusedLAMB kernel: global gradient-norm clipping at 1 (active here), bias correction,
    trust ratio with unclamped norms, decay in the update. eps is 1e-8 here: where it is added (to sqrt(v) rather
    than sqrt(v / (1 - b2^t))) is the one documented difference, negligible when gradients are far above it."""
    from pytorch_optimizer import Lamb

    from uniseg_components.optimizers import create_optimizer

    ours, clipped = _lamb_versus_apex(lambda p, eps: create_optimizer("lamb", p, 2e-3, 1e-5, (0.9, 0.999), eps))
    assert clipped and ours < 2e-5
    plain, _ = _lamb_versus_apex(lambda p, eps: Lamb(p, lr=2e-3, eps=eps, weight_decay=1e-5))  # package defaults
    assert plain > 1e-2
    adamw, _ = _lamb_versus_apex(lambda p, eps: torch.optim.AdamW(p, lr=2e-3, eps=eps, weight_decay=1e-5))
    assert adamw > 1e-2
    # apex's adam_w_mode: the decay is part of the update the trust ratio scales: with zero gradients every tensor
    # shrinks by lr (p -= lr * ||p|| / ||wd p|| * wd p), not by lr * weight_decay (AdamW-style decoupling); a
    # decay well above eps (which the package adds to ||wd p|| in the ratio)
    p = torch.nn.Parameter(torch.randn(5, 4))
    start = p.detach().clone()
    opt = create_optimizer("lamb", [p], lr=0.1, weight_decay=0.1, eps=1e-5)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), start * (1 - 0.1))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and math.isinf(opt.clamp)
    adam = create_optimizer("AdamW", [p], lr=0.1, eps=1e-8)
    assert isinstance(adam, torch.optim.AdamW) and adam.param_groups[0]["eps"] == 1e-8
    with pytest.raises(ValueError, match="unknown optimizer_name 'sgd'"):
        create_optimizer("sgd", [p], lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        lamb([p], max_grad_norm=-1.0)


def _warmup_poly(epoch: int, total: int, warmup: int, power: float = 0.9) -> float:
    if warmup and epoch <= warmup:
        return math.exp(10 * (epoch / warmup - 1))
    return max(0.0, 1 - epoch / total) ** power


def test_warmup_poly_schedule_per_epoch_and_resume(tmp_path, caplog):
    def groups():  # two learning rates, e.g. add_tasks' new and old weights
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (2e-3, 5e-4)]

    opt = torch.optim.SGD(groups())
    sched = WarmupPolyLR(opt, total_iters=20, warmup_epochs=5, power=0.9)
    lrs = []
    for _ in range(20):  # one step per epoch, as LrScheduleHandler does
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for e, (lr, lr_old) in enumerate(lrs):
        assert lr == pytest.approx(2e-3 * _warmup_poly(e, 20, 5), rel=1e-12), e
        assert lr_old == pytest.approx(5e-4 * _warmup_poly(e, 20, 5), rel=1e-12), e
    assert lrs[0][0] == pytest.approx(2e-3 * math.exp(-10)) and lrs[4][0] == pytest.approx(2e-3 * math.exp(-2))
    assert lrs[5][0] == pytest.approx(2e-3) and lrs[6][0] == pytest.approx(2e-3 * 0.7**0.9)  # no restart of the decay
    assert opt.param_groups[0]["lr"] == 0.0  # after the last epoch
    # without warm-up: torch's PolynomialLR, epoch by epoch
    a, b = torch.optim.SGD(groups()), torch.optim.SGD(groups())
    ours, poly = WarmupPolyLR(a, 7, warmup_epochs=0), torch.optim.lr_scheduler.PolynomialLR(b, 7, power=0.9)
    for _ in range(7):
        assert [g["lr"] for g in a.param_groups] == pytest.approx([g["lr"] for g in b.param_groups], rel=1e-12)
        a.step(), b.step(), ours.step(), poly.step()
    # resume: the state loads with weights_only and the next epochs follow the same schedule
    opt = torch.optim.SGD(groups())
    sched = WarmupPolyLR(opt, total_iters=20, warmup_epochs=5)
    for _ in range(7):
        opt.step()
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    opt2 = torch.optim.SGD(groups())
    sched2 = WarmupPolyLR(opt2, total_iters=3, warmup_epochs=1)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert (sched2.total_iters, sched2.warmup_epochs, sched2.last_epoch) == (20, 5, 7)
    for e in range(7, 12):
        assert opt2.param_groups[0]["lr"] == pytest.approx(2e-3 * _warmup_poly(e, 20, 5), rel=1e-12)
        opt2.step()
        sched2.step()
    with caplog.at_level("WARNING"):
        WarmupPolyLR(torch.optim.SGD(groups()), total_iters=3, warmup_epochs=5)
    assert "warm-up learning rates only" in caplog.text
    for bad in ({"total_iters": 0}, {"total_iters": 5, "warmup_epochs": -1}, {"total_iters": 5, "power": -1.0}):
        with pytest.raises(ValueError):
            WarmupPolyLR(torch.optim.SGD(groups()), **bad)


def _ema_run(decay: float, ramp_up: bool, steps: int = 7):
    """A MONAI SupervisedTrainer with an EMAHandler: the handler, the network, and its state after every step."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    ema = EMAHandler(net, decay=decay, ramp_up=ramp_up)
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(steps)]
    opt = torch.optim.SGD(net.parameters(), 0.3)
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=data, network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(), train_handlers=[ema], decollate=False,
    )  # fmt: skip
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(copy.deepcopy(net.state_dict())))
    trainer.run()
    return ema, net, seen


@pytest.mark.parametrize("ramp_up", [True, False])
def test_ema_handler_is_the_recursive_average_of_the_trained_weights(ramp_up):
    decay = 0.8
    ema, net, seen = _ema_run(decay, ramp_up)
    assert ema.num_updates == len(seen) == 7
    params = [n for n, _ in net.named_parameters()]
    expected = {n: seen[0][n].clone() for n in params}  # update 1 copies
    for k in range(2, len(seen) + 1):  # update k: a = min(decay, (k - 1) / k) with the ramp, else decay
        a = min(decay, (k - 1) / k) if ramp_up else decay
        expected = {n: a * expected[n] + (1 - a) * seen[k - 1][n] for n in params}
    got = ema.network.state_dict()
    for n in params:
        torch.testing.assert_close(got[n], expected[n])
    for n in ("0.weight", "1.weight", "2.weight", "2.bias"):  # not the live weights
        assert not torch.allclose(got[n], seen[-1][n], atol=1e-4), n
    for n in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # buffers are copied, not averaged
        assert torch.equal(got[n], seen[-1][n])


def test_ema_handler_state_ddp_and_off(tmp_path):
    ema, net, _ = _ema_run(0.8, True)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert state["num_updates"] == 7 and state["decay"] == 0.8
    again = EMAHandler(torch.nn.DataParallel(net), decay=0.8)  # a wrapped network: its module is averaged
    assert set(again.network.state_dict()) == set(net.state_dict())  # no "module." prefix
    again.load_state_dict(state)
    assert again.num_updates == 7
    for k, v in ema.network.state_dict().items():
        assert torch.equal(again.network.state_dict()[k], v)
    with torch.no_grad():  # the restored average continues: update 8 has a = min(0.8, 7 / 8)
        for p in net.parameters():
            p.add_(1.0)
    expected = {n: 0.8 * p + 0.2 * dict(net.named_parameters())[n] for n, p in ema.network.named_parameters()}
    again.update()
    for n, p in again.network.named_parameters():
        torch.testing.assert_close(p, expected[n])
    assert not any(p.requires_grad for p in again.network.parameters())
    off = EMAHandler(net, decay=0)
    assert off.network is net and off.state_dict() == {} and not off.enabled
    assert EMAHandler(torch.nn.DataParallel(net), decay=None).network is net
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            EMAHandler(net, decay=bad)


# ----------------------------------------------------------------------------- mixed-task batches
def test_sampler_mixes_tasks_within_groups(catalog):
    items = [{"task": n} for n in ["organs_ct"] * 4 + ["lesion_ct"] * 3 + ["brain_t1"] * 2 + ["lesion_petct"] * 2]
    sampler = TaskBalancedBatchSampler.from_items(items, catalog, batch_size=4, batches_per_task=50, mix_tasks=True)
    # groups: 1-channel tasks (the same patch) together, the 2-channel task on its own
    assert sampler.groups == [[0, 1, 2], [3]]
    task_of = [catalog[it["task"]].id for it in items]
    batches = list(sampler)
    assert len(batches) == 4 * 50 == len(sampler)
    mixed, counts = 0, Counter()
    for batch in batches:
        tasks = {task_of[i] for i in batch}
        assert tasks <= {0, 1, 2} or tasks == {3}
        mixed += len(tasks) > 1
        counts.update(task_of[i] for i in batch)
    assert mixed > 100
    # groups drawn by their number of tasks, tasks uniformly within: every task about a quarter of the elements
    assert all(abs(counts[t] / (4 * 200) - 0.25) < 0.1 for t in range(4)), counts
    single = TaskBalancedBatchSampler.from_items(items, catalog, batch_size=4, batches_per_task=5)
    assert all(len({task_of[i] for i in b}) == 1 for b in single)
    # a different patch size is a different group
    other = make_catalog([TASKS[0], task("lesion_ct", 1, ["CT"], ["lesion"], patch=(32, 32, 32))])
    s2 = TaskBalancedBatchSampler.from_items(items[:7], other, batch_size=2, mix_tasks=True)
    assert s2.groups == [[0], [1]]
    # ranks split the same epoch
    ranks = [
        TaskBalancedBatchSampler.from_items(
            items, catalog, 4, batches_per_task=5, mix_tasks=True, num_replicas=2, rank=r
        )
        for r in (0, 1)
    ]
    full = TaskBalancedBatchSampler.from_items(items, catalog, 4, batches_per_task=5, mix_tasks=True).global_batches()
    assert list(ranks[0]) == full[0::2] and list(ranks[1]) == full[1::2]


def test_prepare_batch_mixed_tasks():
    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "label": torch.zeros(2, 1, 4, 4, 4), "task_id": torch.tensor([0, 2])}
    _, _, args, kwargs = PrepareTaskBatch(mixed_tasks=True)(batch)
    assert args == () and kwargs["task_id"].tolist() == [0, 2] and kwargs["task_id"].dtype == torch.long
    with pytest.raises(ValueError, match="mixes tasks"):
        PrepareTaskBatch()(batch)


# ----------------------------------------------------------------------------- inference helpers
def test_targets_to_label_and_transform():
    logits = torch.full((3, 2, 2, 1), -5.0)
    logits[0, 0, 0, 0] = 3.0
    logits[1, 0, 0, 0] = 4.0  # overlap: the more probable target wins in the label map
    logits[2, 1, 1, 0] = 1.0
    lab = targets_to_label(logits)
    assert lab.shape == (1, 2, 2, 1) and lab[0, :, :, 0].tolist() == [[2, 0], [0, 3]]
    assert targets_to_label(logits, target_ids=[4, 5, 9])[0, :, :, 0].tolist() == [[6, 0], [0, 10]]
    out = TargetsToLabeld("pred")({"pred": logits})["pred"]
    assert out.dtype == torch.float32 and torch.equal(out, lab.float())  # MONAI Label's ITK writer: no int64


def test_hermes_merged_inferer_one_pass(catalog):
    net = tiny(catalog).eval()
    tasks = catalog.tasks_for_channels(["CT"])
    inferer = HermesMergedInferer((16, 16, 16), tasks, overlap=0.25)
    assert inferer.target_ids == [0, 1, 2]
    calls = []
    hook = net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["task_ids"].tolist()), with_kwargs=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        merged = inferer(x, net, task_id=5)  # the engine's task id is ignored
        hook.remove()
        ref = net(x, torch.tensor([[0, 1, 2, -1]]), torch.tensor([0]))
    assert calls == [[[0, 1, 2, -1]]]  # one pass for all three targets of the two CT datasets
    assert merged.shape == (1, 1, 16, 16, 16)
    expected = targets_to_label(ref[:, :3], target_ids=[0, 1, 2])
    assert torch.equal(merged.long(), expected)
    assert set(merged.unique().tolist()) <= {0, 1, 2, 3}  # catalog merged labels of organs_ct and lesion_ct
    with pytest.raises(ValueError, match="one modality"):
        HermesMergedInferer((16, 16, 16), [catalog[0], catalog[2]])


# ----------------------------------------------------------------------------- incremental tasks
def upstream_catalog():
    return make_catalog([TASKS[0], {**TASKS[2], "id": 1}], name="upstream")


def extended_catalog():
    return make_catalog([TASKS[0], {**TASKS[2], "id": 1}, {**TASKS[1], "id": 2}, {**TASKS[3], "id": 3}], name="ext")


def test_add_tasks_copies_weights_and_checks_catalog():
    old = tiny(upstream_catalog()).eval()
    new = old.add_tasks(extended_catalog()).eval()
    assert new.task_names == ["organs_ct", "brain_t1", "lesion_ct", "lesion_petct"]
    assert new.modality_names == ["CT", "T1", "CT+PET"] and new.backbone.in_channels == (1, 2)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for t in (0, 1):
            assert torch.equal(new(x, task_id=t), old(x, task_id=t))
        assert new(x, task_id=2).shape == (1, 1, 16, 16, 16)
        assert new(torch.randn(1, 2, 16, 16, 16), task_id=3).shape == (1, 1, 16, 16, 16)
    names = new.new_parameter_names(["organs_ct", "brain_t1"])
    assert any("k_lesion_ct" in n for n in names) and any("stems.2" in n for n in names)
    assert any("k_CT_PET" in n for n in names) and not any("k_organs_ct" in n or "encoder" in n for n in names)
    with pytest.raises(ValueError, match="must start with"):
        old.add_tasks(make_catalog([{**TASKS[1], "id": 0}, {**TASKS[0], "id": 1}, {**TASKS[2], "id": 2}]))
    with pytest.raises(ValueError, match="at least one new task"):
        old.add_tasks(upstream_catalog())


def _train_new_task(net, steps, groups):
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = synthetic_batch(gen)
        loss = HermesLoss()(net.train()(x, task_id=2), (y == 1).float())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_incremental_frozen_keeps_old_outputs_bitwise(tmp_path):
    old = tiny(upstream_catalog()).eval()
    ckpt = save_checkpoint(tmp_path / "up.pt", old, upstream_catalog())
    net = extend_checkpoint(ckpt, extended_catalog())
    assert net.old_tasks == ["organs_ct", "brain_t1"]
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = [net.eval()(x, task_id=t) for t in (0, 1, 2)]
        upstream = [old(x, task_id=t) for t in (0, 1)]
    assert torch.equal(before[0], upstream[0]) and torch.equal(before[1], upstream[1])
    groups = param_groups(net, old_lr_scale=0.0, lr=1e-2)
    assert len(groups) == 1 and not any(p.requires_grad for p in net.backbone.encoder.parameters())
    new_names = set(net.new_parameter_names(net.old_tasks))
    assert all(p.requires_grad == (n in new_names) for n, p in net.named_parameters())
    _train_new_task(net, 3, groups)
    with torch.no_grad():
        after = [net.eval()(x, task_id=t) for t in (0, 1, 2)]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])


def test_incremental_lower_lr_changes_old_weights():
    net = extend_network(tiny(upstream_catalog()), extended_catalog())
    stem = net.backbone.stems["1"].weight.detach().clone()
    groups = param_groups(net, old_lr_scale=0.1, lr=1e-2)
    assert [g["lr"] for g in groups] == [1e-2, pytest.approx(1e-3)]
    _train_new_task(net, 2, groups)
    assert not torch.equal(net.backbone.stems["1"].weight, stem)
    with pytest.raises(ValueError, match="old_tasks"):
        param_groups(tiny(upstream_catalog()))


# ----------------------------------------------------------------------------- export
def test_torchscript_matches_eager(catalog, tmp_path):
    net = tiny(catalog).eval()
    with torch.no_grad():
        for p in net.fusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_torchscript(net, tmp_path / "hermes.ts")
    loaded = torch.jit.load(str(tmp_path / "hermes.ts"))
    # one stem each, and a request of another length than the traced one (no re-optimisation: a fast test)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        for c, t in ((1, 0), (1, 2), (2, 3)):
            x = torch.randn(1, c, 16, 16, 16)
            ids, mod = net.request([t])
            torch.testing.assert_close(loaded(x, ids, mod), net(x, ids, mod), atol=1e-5, rtol=1e-4)


def test_onnx_export_matches_eager(catalog, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from uniseg_components.export import export_onnx

    net = tiny(catalog).eval()
    path = export_onnx(net, tmp_path / "hermes.onnx", channels=1, default_task=0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "task_ids", "modality_id"]
    x = torch.randn(1, 1, 16, 16, 16)
    for t in (0, 2):  # another request length than the traced one
        ids, mod = net.request([t])
        with torch.no_grad():
            eager = net(x, ids, mod).numpy()
        (got,) = sess.run(None, {"image": x.numpy(), "task_ids": ids.numpy(), "modality_id": mod.numpy()})
        assert got.shape == eager.shape
        assert abs(got - eager).max() < 1e-4


def test_cli_infer_reads_sigmoid_targets(catalog, tmp_path):
    """CLI ``infer`` (the Hermes bundle's inference config) turns the per-target sigmoid logits into label maps: no
    target above 0.5 gives background, every target above gives a foreground label of the task; ``--task all`` merges
    every target of the modality."""
    import nibabel as nib
    import numpy as np

    from uniseg_components import cli

    net = tiny(catalog).eval()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 100, (20, 18, 16)).astype(np.float32), np.eye(4)), path)
    maps = {}
    for name, bias in (("low", -50.0), ("high", 50.0)):
        with torch.no_grad():
            net.logit_bias.fill_(bias)
        ckpt = str(save_checkpoint(tmp_path / f"{name}.pt", net, catalog))
        (out,) = cli.infer(ckpt, str(path), task="organs_ct", out=str(tmp_path / name))
        maps[name] = np.asarray(nib.load(out).dataobj)
    assert maps["low"].shape == (20, 18, 16) and int(maps["low"].max()) == 0
    assert set(np.unique(maps["high"]).tolist()) <= {1, 2} and int(maps["high"].min()) >= 1
    (merged,) = cli.infer(ckpt, str(path), task="all", modality="CT", out=str(tmp_path / "all"))
    merged = np.asarray(nib.load(merged).dataobj)
    organs, lesion = catalog["organs_ct"], catalog["lesion_ct"]
    assert merged.shape == (20, 18, 16) and int(merged.min()) >= 1  # every voxel gets some target's label
    labels = {organs.label_offset + c for c in (1, 2)} | {lesion.label_offset + 1}
    assert set(np.unique(merged).tolist()) <= labels


def test_cross_attention_equals_multihead_attention_with_fewer_ops():
    """cross_attention (one key/value product, one split of the projection weights, the padding bias computed
    once): the output and the weight gradients of nn.MultiheadAttention's own forward, for a boolean mask and for
    its key_padding_bias, and fewer operations than three separately sliced projections."""
    from uniseg_components.benchmark import step_op_counts
    from uniseg_components.methods.hermes.network import cross_attention, key_padding_bias

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    query, context = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    expected = attn(query, context, context, key_padding_mask=mask, need_weights=False)[0]
    ref_grads = torch.autograd.grad(expected.square().sum(), list(attn.parameters()))
    for m in (mask, key_padding_bias(mask)):
        got = cross_attention(attn, query, context, m)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(got.square().sum(), list(attn.parameters())), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert key_padding_bias(mask).shape == (2, 1, 1, 7) and bool(key_padding_bias(mask)[0, 0, 0, 5:].isinf().all())

    def sliced():  # three slices of in_proj: what each one costs in the backward pass
        c, w, b = 16, attn.in_proj_weight, attn.in_proj_bias
        q, k, v = (
            torch.nn.functional.linear(t, w[i * c : (i + 1) * c], b[i * c : (i + 1) * c])
            for i, t in enumerate((query, context, context))
        )
        split = [t.reshape(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=(~mask)[:, None, None, :])
        return attn.out_proj(out.transpose(1, 2).reshape(2, 5, 16))

    torch.testing.assert_close(sliced(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be bool"):
        cross_attention(attn, query, context, mask.to(torch.uint8))
    ours = step_op_counts(lambda: cross_attention(attn, query, context, mask).sum().backward())
    theirs = step_op_counts(lambda: sliced().sum().backward())
    assert ours["ops"] < theirs["ops"]

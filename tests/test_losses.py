"""Dice + CE over a task's own classes, with nnU-Net's deep-supervision weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from uniseg_components.losses import TaskDiceCELoss, deep_supervision_weights


def _target(shape=(2, 1, 8, 8, 8), k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, shape, generator=g).float()


def _onehot_logits(target: torch.Tensor, k: int, scale: float = 20.0) -> torch.Tensor:
    oh = F.one_hot(target[:, 0].long(), k).movedim(-1, 1).float()
    return scale * (2 * oh - 1)


def test_deep_supervision_weights_5():
    w = deep_supervision_weights(5)
    assert w == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert w == pytest.approx([0.5333, 0.2667, 0.1333, 0.0667, 0.0], abs=1e-4)
    assert sum(w) == pytest.approx(1.0)
    assert w[-1] == 0.0
    assert all(a > b for a, b in zip(w, w[1:]))


def test_deep_supervision_weights_edge_cases():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="levels"):
        deep_supervision_weights(0)


def test_perfect_logits_near_zero_random_larger():
    torch.manual_seed(0)
    loss_fn = TaskDiceCELoss()
    target = _target()
    perfect = loss_fn(_onehot_logits(target, 3), target)
    random = loss_fn(torch.randn(2, 3, 8, 8, 8), target)
    assert perfect.ndim == 0
    assert float(perfect) < 1e-3
    assert float(random) > 0.5
    # the CE part alone is small, the Dice part alone is ~0
    ce_only = TaskDiceCELoss(lambda_dice=0.0)(_onehot_logits(target, 3), target)
    dice_only = TaskDiceCELoss(lambda_ce=0.0)(_onehot_logits(target, 3), target)
    assert float(ce_only) < 1e-6
    assert float(dice_only) < 1e-4


def test_loss_decreases_towards_target():
    torch.manual_seed(0)
    loss_fn = TaskDiceCELoss()
    target = _target(k=4)
    noise = torch.randn(2, 4, 8, 8, 8)
    oh = _onehot_logits(target, 4, scale=1.0)
    losses = [float(loss_fn(noise + t * oh, target)) for t in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_matches_monai_dicece_without_background():
    torch.manual_seed(0)
    target = _target()
    logits = torch.randn(2, 3, 8, 8, 8)
    ref = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    assert torch.allclose(TaskDiceCELoss()(logits, target), ref(logits, target))
    # the background channel does not enter the Dice term
    dice_only = TaskDiceCELoss(lambda_ce=0.0)
    assert float(dice_only(logits, target)) > 0.3


def test_target_without_channel_dim():
    torch.manual_seed(0)
    target = _target()
    logits = torch.randn(2, 3, 8, 8, 8)
    loss_fn = TaskDiceCELoss()
    assert torch.allclose(loss_fn(logits, target[:, 0]), loss_fn(logits, target))


def test_deep_supervision_list_input():
    torch.manual_seed(0)
    loss_fn = TaskDiceCELoss()
    target = _target(shape=(2, 1, 16, 16, 16))
    outs = [torch.randn(2, 3, s, s, s) for s in (16, 8, 4)]
    loss = loss_fn(outs, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # equals the weighted sum over levels with nearest-exact downsampled targets; the last level has weight 0
    single = TaskDiceCELoss()
    w = deep_supervision_weights(3)
    manual = sum(
        wi * single(o, F.interpolate(target, size=o.shape[2:], mode="nearest-exact")) for wi, o in zip(w, outs)
    )
    assert torch.allclose(loss, manual, atol=1e-6)
    # a single-element list equals the plain tensor loss
    assert torch.allclose(loss_fn([outs[0]], target), loss_fn(outs[0], target))


def test_perfect_deep_supervision_is_near_zero():
    target = _target(shape=(2, 1, 16, 16, 16), k=2)
    outs = [_onehot_logits(F.interpolate(target, size=(s,) * 3, mode="nearest-exact"), 2) for s in (16, 8, 4)]
    assert float(TaskDiceCELoss()(outs, target)) < 1e-3


def test_out_of_range_label_raises():
    loss_fn = TaskDiceCELoss()
    target = _target()
    target[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="3 classes"):
        loss_fn(torch.randn(2, 3, 8, 8, 8), target)
    target[0, 0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        loss_fn([torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)], target)
    # labels 0 and 1 with a 2-class output are fine, label 2 is not
    ok = _target(k=2)
    loss_fn(torch.randn(2, 2, 8, 8, 8), ok)
    with pytest.raises(ValueError, match="classes"):
        loss_fn(torch.randn(2, 2, 8, 8, 8), ok + 1)


def test_zero_weight_level_gets_no_gradient():
    torch.manual_seed(0)
    target = _target(shape=(2, 1, 16, 16, 16))
    outs = [torch.randn(2, 3, s, s, s, requires_grad=True) for s in (16, 8, 4)]
    TaskDiceCELoss()(outs, target).backward()
    assert outs[0].grad is not None and outs[0].grad.abs().sum() > 0
    assert outs[1].grad is not None and outs[1].grad.abs().sum() > 0
    assert outs[2].grad is None or outs[2].grad.abs().sum() == 0
    # and changing the lowest level does not change the loss
    with torch.no_grad():
        a = TaskDiceCELoss()(outs, target)
        b = TaskDiceCELoss()([outs[0], outs[1], torch.randn(2, 3, 4, 4, 4)], target)
    assert torch.equal(a, b)


def test_batch_dice_option_changes_result():
    torch.manual_seed(0)
    target = _target()
    logits = torch.randn(2, 3, 8, 8, 8)
    a = TaskDiceCELoss(batch_dice=True, lambda_ce=0.0)(logits, target)
    b = TaskDiceCELoss(batch_dice=False, lambda_ce=0.0)(logits, target)
    assert not torch.allclose(a, b)

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``uniseg import-weights``: the UniSeg authors' checkpoint layout (yeerwen/UniSeg, ``UniSeg_model`` on nnU-Net v1's
``Generic_UNet``), rebuilt here from their module definitions at a tiny plan, converted, and checked against their
forward pass on the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import task_dict
from torch import nn

from uniseg_components import cli
from uniseg_components.checkpoints import load_checkpoint
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.methods.uniseg.finetune import load_upstream_weights
from uniseg_components.methods.uniseg.import_weights import authors_keys, convert_authors_state_dict
from uniseg_components.tasks import TaskCatalog

pytestmark = pytest.mark.usefixtures("single_thread")

# the plan in nnU-Net's (z, y, x) axis order, as the authors' planner writes it: stage 0 is in-plane only
FEATURES = [4, 8, 16, 16]
KERNELS_ZYX = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
POOL_ZYX = [[1, 2, 2], [2, 2, 2], [2, 2, 2]]
PATCH_ZYX = [8, 16, 16]


class _ConvNormAct(nn.Module):
    """nnU-Net v1's ConvDropoutNormNonlin (dropout 0): attributes ``conv``, ``instnorm``, ``lrelu``."""

    def __init__(self, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=[1 if k == 3 else 0 for k in kernel])
        self.instnorm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.lrelu = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.instnorm(self.conv(x)))


class _MultiChannel(nn.Module):
    """The authors' ConvDropoutNormNonlin_multi_channel: ``conv_1``, ``conv_2``, ``conv_4`` chosen by the input's
    channel count, one ``instnorm``."""

    def __init__(self, cout: int, kernel: list[int]) -> None:
        super().__init__()
        pad = [1 if k == 3 else 0 for k in kernel]
        self.conv_1, self.conv_2, self.conv_4 = (nn.Conv3d(c, cout, kernel, 1, pad) for c in (1, 2, 4))
        self.instnorm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.lrelu = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = {1: self.conv_1, 2: self.conv_2, 4: self.conv_4}[x.shape[1]]
        return self.lrelu(self.instnorm(conv(x)))


class _Stacked(nn.Module):
    """nnU-Net v1's StackedConvLayers: ``blocks``, a Sequential whose first block takes the stride."""

    def __init__(self, first: nn.Module, cout: int, n: int, kernel: list[int]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(first, *[_ConvNormAct(cout, cout, kernel) for _ in range(n - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class AuthorsUniSeg(nn.Module):
    """UniSeg_model as the authors define it (2 convs per stage, convolutional pooling and upsampling), at any
    plan: the attribute names give their state-dict keys; ``forward`` is theirs, returning the full-resolution
    logits (deep supervision off)."""

    def __init__(self, num_tasks: int, num_classes: int) -> None:
        super().__init__()
        f, k = FEATURES, KERNELS_ZYX
        n_pool = len(POOL_ZYX)
        context = [_Stacked(_MultiChannel(f[0], k[0]), f[0], 2, k[0])]
        for d in range(1, n_pool):
            context.append(_Stacked(_ConvNormAct(f[d - 1], f[d], k[d], POOL_ZYX[d - 1]), f[d], 2, k[d]))
        bottleneck = nn.Sequential(
            _Stacked(_ConvNormAct(f[n_pool - 1], f[n_pool], k[n_pool], POOL_ZYX[-1]), f[n_pool], 1, k[n_pool]),
            _Stacked(_ConvNormAct(f[n_pool], f[n_pool], k[n_pool]), f[n_pool], 1, k[n_pool]),
        )
        self.conv_blocks_context = nn.ModuleList([*context, bottleneck])
        bz = [p // int(np.prod([s[i] for s in POOL_ZYX])) for i, p in enumerate(PATCH_ZYX)]
        self.intermedia_prompt = nn.Parameter(torch.randn(1, num_tasks, *bz))
        hidden = (f[-1] + num_tasks) // 4
        self.fusion_layer = _Stacked(_ConvNormAct(f[-1] + num_tasks, hidden, k[-1]), hidden, 1, k[-1])
        self.fusion_layer.blocks.append(_ConvNormAct(hidden, hidden, k[-1]))
        self.fusion_layer.blocks.append(_ConvNormAct(hidden, num_tasks, k[-1]))
        tu, loc, seg = [], [], []
        down = f[-1] + 1
        for u in range(n_pool):
            skip = f[n_pool - 1 - u]
            tu.append(nn.ConvTranspose3d(down, skip, POOL_ZYX[-(u + 1)], POOL_ZYX[-(u + 1)], bias=False))
            kernel = k[-(u + 1)]
            loc.append(
                nn.Sequential(
                    _Stacked(_ConvNormAct(2 * skip, skip, kernel), skip, 1, kernel),
                    _Stacked(_ConvNormAct(skip, skip, kernel), skip, 1, kernel),
                )
            )
            seg.append(nn.Conv3d(skip, num_classes, 1, 1, 0, 1, 1, False))
            down = skip
        self.tu, self.conv_blocks_localization, self.seg_outputs = (
            nn.ModuleList(tu),
            nn.ModuleList(loc),
            nn.ModuleList(seg),
        )

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        prompt = self.intermedia_prompt.repeat(x.shape[0], 1, 1, 1, 1)
        dynamic = self.fusion_layer(torch.cat([x, prompt], dim=1))
        x = torch.cat([x, torch.index_select(dynamic, 1, task_id[0])], dim=1)
        for u in range(len(self.tu)):
            x = self.conv_blocks_localization[u](torch.cat([self.tu[u](x), skips[-(u + 1)]], dim=1))
            out = self.seg_outputs[u](x)
        return out


def _catalog() -> TaskCatalog:
    """Three tasks with 1, 2 and 4 input channels (all three stems) and the tiny plan in MONAI's (x, y, z) order."""
    tasks = [
        task_dict("organ", 0, labels=("background", "organ", "tumour"), patch=PATCH_ZYX[::-1]),
        task_dict("petct", 1, modalities=("CT", "PET"), patch=PATCH_ZYX[::-1]),
        task_dict("brain", 2, labels=("background", "a", "b", "c"), modalities=("T1", "T1c", "T2", "FLAIR"),
                  patch=PATCH_ZYX[::-1]),
    ]  # fmt: skip
    plan = {
        "patch_size": PATCH_ZYX[::-1],
        "features": FEATURES,
        "kernel_sizes": [kk[::-1] for kk in KERNELS_ZYX],
        "strides": [[1, 1, 1]] + [p[::-1] for p in POOL_ZYX],
        "decoder_kernel_sizes": [[3, 3, 3]] * len(POOL_ZYX),
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
    }
    return TaskCatalog(tasks, "authors_tiny", plan)


@pytest.fixture(scope="module")
def authors(tmp_path_factory) -> dict:
    """The authors' network at the tiny plan with random weights (norm affines too), saved as nnU-Net v1 does: a
    ``.model`` file with the epoch, the state dict, the optimiser state and numpy training curves."""
    root = tmp_path_factory.mktemp("authors")
    torch.manual_seed(0)
    net = AuthorsUniSeg(num_tasks=3, num_classes=4).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "instnorm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)
    curves = [np.float64(0.5), np.float64(0.4)]
    torch.save(
        {"epoch": 1000, "state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
         "amp_grad_scaler": {}, "plot_stuff": (curves, curves, curves, curves), "best_stuff": (999, 0.4, 0.5, 0.6)},
        root / "model_final_checkpoint.model",
    )  # fmt: skip
    catalog = _catalog()
    catalog.save(root / "tasks.json")
    return {"root": root, "net": net, "path": root / "model_final_checkpoint.model", "catalog": catalog}


def test_converted_weights_give_the_authors_outputs_for_every_task_and_stem(authors, tmp_path) -> None:
    out = tmp_path / "model.pt"
    cli.main(
        ["import-weights", str(authors["path"]), "--out", str(out), "--catalog", str(authors["root"] / "tasks.json")]
    )
    ours, catalog = load_checkpoint(out)
    assert isinstance(ours, UniSeg) and catalog.names == authors["catalog"].names
    ours.eval()
    torch.manual_seed(1)
    for task in catalog:
        x = torch.randn(2, task.num_channels, *PATCH_ZYX)  # (B, C, z, y, x), nnU-Net's order
        with torch.no_grad():
            theirs = authors["net"](x, torch.tensor([task.id, task.id]))[:, : task.num_classes]
            mine = ours(x.permute(0, 1, 4, 3, 2), task.id)  # the same image in MONAI's (x, y, z) order
        np.testing.assert_allclose(mine.permute(0, 1, 4, 3, 2).numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4)
        assert theirs.abs().max() > 0.1  # the outputs carry signal, so agreeing means something


def test_every_tensor_lands_in_its_place_and_none_is_left(authors) -> None:
    theirs = authors["net"].state_dict()
    net = UniSeg.from_catalog(authors["catalog"])
    keys = authors_keys(net)
    assert sorted(keys.values()) == sorted(theirs)  # a bijection between the two layouts
    state = convert_authors_state_dict(theirs, net)
    for ours, t in keys.items():  # shape and a value spot check per key
        a, b = state[ours], theirs[t]
        assert tuple(a.shape) == tuple(b.shape[:2]) + tuple(b.shape[2:][::-1])
        idx = tuple(min(1, s - 1) for s in b.shape)
        assert a[idx[:2] + idx[2:][::-1]] == b[idx]
    with pytest.raises(ValueError, match=r"not used: \['extra.weight'\]"):
        convert_authors_state_dict({**theirs, "extra.weight": torch.zeros(1)}, net)
    with pytest.raises(ValueError, match=r"missing: \['tu.0.weight'\]"):
        convert_authors_state_dict({k: v for k, v in theirs.items() if k != "tu.0.weight"}, net)
    other = UniSeg.from_catalog(authors["catalog"].select(names=["organ", "petct"]))  # 2 tasks: prompt and FUSE differ
    with pytest.raises(ValueError, match=r"shapes .*intermedia_prompt \(1, 3, 2, 2, 2\) -> prompt \(1, 2, 2, 2, 2\)"):
        convert_authors_state_dict(theirs, other)


def test_fine_tune_starts_from_the_imported_checkpoint(authors, tmp_path) -> None:
    """The fine-tune bundle's --pretrained loader takes the converted checkpoint: the backbone carries the authors'
    weights (the prompt input channel of the first up-convolution dropped, new heads)."""
    out = tmp_path / "model.pt"
    cli.main(
        ["import-weights", str(authors["path"]), "--out", str(out), "--catalog", str(authors["root"] / "tasks.json")]
    )
    from uniseg_components.methods.uniseg import UniSegDownstream

    down = UniSegDownstream.from_catalog(authors["catalog"].select(names=["organ"]))
    load_upstream_weights(down, str(out))
    theirs = authors["net"].state_dict()
    np.testing.assert_array_equal(
        down.state_dict()["backbone.encoder.1.0.conv.weight"].numpy(),
        theirs["conv_blocks_context.1.blocks.0.conv.weight"].permute(0, 1, 4, 3, 2).numpy(),
    )


def test_an_unreadable_or_foreign_checkpoint_is_refused(tmp_path) -> None:
    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.01)}, tmp_path / "foreign.model")  # any class
    with pytest.raises(SystemExit):
        cli.main(["import-weights", str(tmp_path / "foreign.model"), "--out", str(tmp_path / "x.pt")])
    with pytest.raises(
        ValueError, match=r"cannot be read with weights_only=True \(it holds objects of argparse.Namespace\).*--unsafe"
    ):
        from uniseg_components.methods.uniseg.import_weights import read_authors_checkpoint

        read_authors_checkpoint(tmp_path / "foreign.model")
    assert not (tmp_path / "x.pt").exists()

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""Hermes: context-prior learning for universal segmentation (Gao et al., CVPR 2024, arXiv 2306.02416).

The shared plan-driven U-Net (:class:`~uniseg_components.networks.backbone.UNetBackbone`, no heads) is made task-
and modality-aware by learnable *prior tokens*: one task token per target (foreground class) of every dataset in
the catalog, ``modality_tokens`` tokens per modality combination and one null token, each pool owned by one
fusion stage. At every fusion stage (through the backbone's stage hooks) :class:`TwoWayAttentionBlock` s let the
selected tokens attend to the features and the features attend to the tokens. The resulting *posterior* task
tokens of all fusion stages are projected to one prototype per requested target, whose dot product with the
final decoder features gives one sigmoid logit map per target (targets may overlap); the posterior modality
tokens classify the input's modality (an auxiliary loss).

Targets and modalities come from the task catalog: target ``t.label_offset + c - 1`` is foreground class ``c`` of
task ``t`` (so ``target id + 1`` is the catalog's merged label value), and the modality classes are the distinct
tuples of a task's channel modalities, named ``"+".join(modalities)`` (``"CT"``, ``"CT+PET"``...), in order of
first appearance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...networks.backbone import UNetBackbone
from ...networks.blocks import DefaultTask
from ...networks.plans import UNetPlan, plan_from_catalog

__all__ = [
    "TwoWayAttentionBlock",
    "Hermes",
    "hermes_tables",
    "default_fusion_stages",
    "cross_attention",
    "key_padding_bias",
]


def hermes_tables(catalog: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The catalog-derived tables Hermes is built from.

    Args:
        catalog: a :class:`~uniseg_components.tasks.TaskCatalog` (3D tasks only).

    Returns:
        ``(tasks, modalities)``: per task in id order ``{"name", "num_targets", "target_offset", "modality",
        "channels"}`` (``target_offset`` is the task's ``label_offset``, ``modality`` an index into
        ``modalities``), and the modality class names in order of first appearance.

    Raises:
        ValueError: the catalog has 2D tasks.
    """
    two_d = [t.name for t in catalog if t.dims != 3]
    if two_d:
        raise ValueError(
            f"Hermes is a 3D model but catalog {catalog.name!r} has 2D task(s) {two_d}; use catalog.select(dims=3)."
        )
    modalities: list[str] = []
    tasks = []
    for t in catalog:
        mod = "+".join(t.modalities)
        if mod not in modalities:
            modalities.append(mod)
        tasks.append(
            {
                "name": t.name,
                "num_targets": t.num_classes - 1,
                "target_offset": int(t.label_offset),
                "modality": modalities.index(mod),
                "channels": t.num_channels,
            }
        )
    return tasks, modalities


def default_fusion_stages(num_stages: int) -> tuple[list[str], list[int]]:
    """The paper's fusion stages for a backbone of ``num_stages`` encoder stages and their block counts.

    The two deepest encoder stages before the bottleneck, the bottleneck (4 blocks) and the two deepest decoder
    stages (2 blocks each): ``["enc{n-3}", "enc{n-2}", "enc{n-1}", "dec0", "dec1"]`` with ``[2, 2, 4, 2, 2]``;
    stages that do not exist in a shallow plan are left out.
    """
    n = int(num_stages)
    names = [f"enc{i}" for i in range(max(0, n - 3), n)] + [f"dec{s}" for s in range(min(2, n - 1))]
    return names, [4 if name == f"enc{n - 1}" else 2 for name in names]


def _key(name: str) -> str:
    """A valid ``ParameterDict`` key for a task or modality name."""
    return "k_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def _ffn(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = max(1, int(round(dim * mlp_ratio)))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def key_padding_bias(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """The additive attention bias of a key padding mask: ``0`` where a key is attended, ``-inf`` where it is ignored.

    Computed once per forward pass and handed to every :func:`cross_attention` call that uses the mask, instead of
    each call converting the boolean mask again (three small kernels per call).

    Shapes: ``key_padding_mask`` ``(B, Lk)`` bool (``True`` = ignore); returns ``(B, 1, 1, Lk)`` float32.
    """
    bias = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=key_padding_mask.device)
    return bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]


def cross_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    context: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn(query, context, context, key_padding_mask=...)[0]`` of a ``batch_first`` ``nn.MultiheadAttention``,
    computed from its weights with ``scaled_dot_product_attention``.

    The result equals the module's own (within float round-off), but unlike ``nn.MultiheadAttention.forward`` (which
    takes another kernel path when none of its weights requires gradients) it does not depend on ``requires_grad``:
    freezing a trained Hermes leaves its outputs bitwise the same. Keys and values come from one matrix product with
    the key and value rows of ``in_proj_weight``, and the projection weights are taken with one ``split``, so the
    backward pass gathers their gradients with one concatenation instead of zero-filling the whole weight per slice.

    Shapes: ``query`` ``(B, Lq, C)``, ``context`` ``(B, Lk, C)``, ``key_padding_mask`` ``(B, Lk)`` bool (``True``
    = ignore), its :func:`key_padding_bias` ``(B, 1, 1, Lk)``, or ``None``; returns ``(B, Lq, C)``.
    """
    c, h = attn.embed_dim, attn.num_heads
    w_q, w_kv = attn.in_proj_weight.split([c, 2 * c])
    b_q, b_kv = (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.split([c, 2 * c])
    bsz, lq, lk = query.shape[0], query.shape[1], context.shape[1]
    q = F.linear(query, w_q, b_q).reshape(bsz, lq, h, c // h).transpose(1, 2)
    k, v = (t.reshape(bsz, lk, h, c // h).transpose(1, 2) for t in F.linear(context, w_kv, b_kv).split(c, dim=-1))
    mask = key_padding_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = key_padding_bias(mask)
    elif mask is not None and not mask.is_floating_point():
        raise ValueError(
            f"key_padding_mask must be bool (True = ignore) or a float key_padding_bias, got dtype {mask.dtype}."
        )
    if mask is not None and mask.dtype != q.dtype:  # autocast: the bias follows the attention's dtype
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out_proj(out.transpose(1, 2).reshape(bsz, lq, c))


def _num_heads(dim: int, head_dim: int) -> int:
    """The most heads ``<= dim // head_dim`` (at least 1) that divide ``dim``."""
    h = max(1, dim // max(1, head_dim))
    while dim % h:
        h -= 1
    return h


class TwoWayAttentionBlock(nn.Module):
    """Two-way cross-attention between prior tokens and flattened features, pre-norm throughout.

    ``tokens += Attn(q=LN(tokens), kv=LN(features)); tokens += FFN(LN(tokens));
    features += Attn(q=LN(features), kv=LN(tokens)); features += FFN(LN(features))``.

    The output projections of the feature-side attention and FFN start at zero, so a fresh block leaves the
    features unchanged (a fresh Hermes computes the plain U-Net's features) and the fusion is learnt from there.
    The attentions are ``nn.MultiheadAttention`` modules (``batch_first``) evaluated with :func:`cross_attention`.

    Args:
        dim: channels of tokens and features.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: FFN hidden width / ``dim``, default 4.

    Shapes:
        ``forward(tokens (B, T, dim), features (B, L, dim), token_mask (B, T) bool or None)`` returns the updated
        ``(tokens, features)``. ``token_mask`` marks tokens the features must not attend to (padding); its
        :func:`key_padding_bias` ``(B, 1, 1, T)`` may be passed instead (what Hermes does: once per forward pass).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide dim {dim}.")
        self.norm_tok_q = nn.LayerNorm(dim)
        self.norm_feat_kv = nn.LayerNorm(dim)
        self.attn_tok = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_tok_mlp = nn.LayerNorm(dim)
        self.mlp_tok = _ffn(dim, mlp_ratio)
        self.norm_feat_q = nn.LayerNorm(dim)
        self.norm_tok_kv = nn.LayerNorm(dim)
        self.attn_feat = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_feat_mlp = nn.LayerNorm(dim)
        self.mlp_feat = _ffn(dim, mlp_ratio)
        for layer in (self.attn_feat.out_proj, self.mlp_feat[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, tokens: torch.Tensor, features: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens + cross_attention(self.attn_tok, self.norm_tok_q(tokens), self.norm_feat_kv(features))
        tokens = tokens + self.mlp_tok(self.norm_tok_mlp(tokens))
        t = self.norm_tok_kv(tokens)
        features = features + cross_attention(self.attn_feat, self.norm_feat_q(features), t, token_mask)
        features = features + self.mlp_feat(self.norm_feat_mlp(features))
        return tokens, features


class _StagePriors(nn.Module):
    """The prior tokens of one fusion stage: per-task and per-modality parameters plus one null token."""

    def __init__(self, dim: int, tasks: Sequence[Mapping[str, Any]], modalities: Sequence[str], length: int) -> None:
        super().__init__()
        self.null = nn.Parameter(torch.zeros(1, dim))
        # ParameterDict sorts the keys of a plain dict: keep the task / modality order separately
        self.task_keys = [_key(t["name"]) for t in tasks]
        self.modality_keys = [_key(m) for m in modalities]
        self.tasks = nn.ParameterDict()
        for k, t in zip(self.task_keys, tasks):
            self.tasks[k] = nn.Parameter(torch.zeros(t["num_targets"], dim))
        self.modalities = nn.ParameterDict()
        for k in self.modality_keys:
            self.modalities[k] = nn.Parameter(torch.zeros(length, dim))
        for p in self.parameters():
            nn.init.trunc_normal_(p, std=0.02)

    def task_table(self) -> torch.Tensor:
        """``(1 + num_targets_total, dim)``: the null token, then every task's tokens in task order."""
        return torch.cat([self.null] + [self.tasks[k] for k in self.task_keys], dim=0)

    def modality_table(self) -> torch.Tensor:
        """``(M, length, dim)`` in modality order."""
        return torch.stack([self.modalities[k] for k in self.modality_keys], dim=0)


class Hermes(DefaultTask, nn.Module):
    """Hermes on the shared plan-driven backbone: context priors, two-way prior fusion, posterior prototypes.

    **Request.** ``forward(x, task_ids, modality_id)`` with ``task_ids`` ``(B, n)`` global target ids (``-1`` is
    the null token, used for padding) and ``modality_id`` ``(B,)``; a ``(1, n)`` / ``(1,)`` request is broadcast
    to the batch (sliding-window batches). Or ``forward(x, task_id=...)`` with a dataset id (an int or one per
    sample): the request is every target of the sample's dataset in class order, padded with ``-1`` to the
    longest list in the batch plus one, and the dataset's modality (what the engines and the task-aware
    sliding-window inferer pass). At every fusion stage each sample sees its requested task tokens (null for
    ``-1``), one extra null token and the ``modality_tokens`` modality tokens; the features attend to every
    token except the padding (``-1``) entries, so a sample's output does not depend on the padding or on the other
    samples of the batch.

    **Output.** Eval mode: logits ``(B, n, *spatial)``, one sigmoid mask per requested target (padding channels
    carry the null prototype's logits); with ``task_id=`` only the dataset's own targets (``(B, K_t - 1,
    *spatial)``; in a batch mixing datasets the longest list, other samples' extra channels set to -1e4).
    Training mode: ``{"pred": (B, n, *spatial), "modality": (B, M), "task_ids": (B, n), "modality_id": (B,)}``
    for :class:`~uniseg_components.losses.HermesLoss`.

    **Initialisation.** Tokens trunc-normal (std 0.02); the feature-side output projections of every fusion block
    start at zero (see :class:`TwoWayAttentionBlock`), so a fresh Hermes' decoder features are the plain U-Net's;
    the logit bias starts at -2 (sigmoid 0.12).

    Args:
        plan: the backbone plan (3D).
        tasks: per task ``{"name", "num_targets", "target_offset", "modality"}`` in id order (see
            :func:`hermes_tables`); target ids ``target_offset .. target_offset + num_targets - 1``.
        modalities: modality class names (``modality`` of a task indexes this list).
        in_channels: input channel counts, one stem each, default ``(1,)``.
        fusion_stages: stage names ``"enc{i}"`` (``enc{n-1}`` is the bottleneck) and ``"dec{s}"`` (0 = deepest),
            default ``None`` = :func:`default_fusion_stages`.
        blocks_per_stage: fusion blocks per stage (same order as ``fusion_stages``), default ``None`` = the
            paper's (4 at the bottleneck, 2 elsewhere).
        modality_tokens: tokens per modality, default 10.
        head_dim: attention head width, default 32 (heads = ``dim // head_dim``, at least 1).
        mlp_ratio: FFN width ratio of the fusion blocks, default 4.

    Example::

        catalog = TaskCatalog.builtin("uniseg_11tasks")
        net = Hermes.from_catalog(catalog).eval()
        ids, mod = net.request([0, 1])                       # liver and kidney targets, CT
        net(torch.zeros(1, 1, 192, 192, 64), ids, mod).shape  # (1, 5, 192, 192, 64): 4 targets + 1 null
    """

    def __init__(
        self,
        plan: UNetPlan,
        tasks: Sequence[Mapping[str, Any]],
        modalities: Sequence[str],
        in_channels: Sequence[int] = (1,),
        fusion_stages: Sequence[str] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        modality_tokens: int = 10,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if plan.spatial_dims != 3:
            raise ValueError(f"Hermes is a 3D model, got a {plan.spatial_dims}D plan.")
        self.plan = plan
        self.tasks = [
            {k: (str(t[k]) if k == "name" else int(t[k])) for k in ("name", "num_targets", "target_offset", "modality")}
            for t in tasks
        ]
        self.modality_names = [str(m) for m in modalities]
        self._check_tables()
        self.modality_tokens = int(modality_tokens)
        if self.modality_tokens < 1:
            raise ValueError(f"modality_tokens must be >= 1, got {modality_tokens}.")
        self.head_dim, self.mlp_ratio = int(head_dim), float(mlp_ratio)
        n = plan.num_stages
        stages, blocks = default_fusion_stages(n)
        if fusion_stages is not None:
            stages = [str(s) for s in fusion_stages]
            blocks = [4 if s == f"enc{n - 1}" else 2 for s in stages] if blocks_per_stage is None else blocks
        if blocks_per_stage is not None:
            blocks = [int(b) for b in blocks_per_stage]
        valid = [f"enc{i}" for i in range(n)] + [f"dec{s}" for s in range(n - 1)]
        bad = [s for s in stages if s not in valid]
        if bad or not stages or len(set(stages)) != len(stages):
            raise ValueError(
                f"fusion_stages must be distinct names among {valid} (enc{n - 1} is the bottleneck, dec0 the "
                f"deepest decoder stage), got {list(stages)}."
            )
        if len(blocks) != len(stages) or any(b < 1 for b in blocks):
            raise ValueError(f"blocks_per_stage needs one count >= 1 per fusion stage {stages}, got {blocks}.")
        order = {name: i for i, name in enumerate(valid)}  # execution order: encoder stages, then decoder
        pairs = sorted(zip(stages, blocks), key=lambda p: order[p[0]])
        self.fusion_stages = [p[0] for p in pairs]
        self.blocks_per_stage = [p[1] for p in pairs]

        self.backbone = UNetBackbone(plan, in_channels, out_channels=0)
        dims = [self.stage_channels(s) for s in self.fusion_stages]
        self.priors = nn.ModuleDict(
            {
                s: _StagePriors(d, self.tasks, self.modality_names, self.modality_tokens)
                for s, d in zip(self.fusion_stages, dims)
            }
        )
        self.fusion = nn.ModuleDict(
            {
                s: nn.ModuleList(
                    [TwoWayAttentionBlock(d, _num_heads(d, self.head_dim), self.mlp_ratio) for _ in range(b)]
                )
                for s, d, b in zip(self.fusion_stages, dims, self.blocks_per_stage)
            }
        )
        total, c0 = sum(dims), plan.features[0]
        self.prototype_norm = nn.LayerNorm(total)
        self.prototype_mlp = nn.Sequential(
            nn.Linear(total, total), nn.GELU(), nn.Linear(total, c0), nn.GELU(), nn.Linear(c0, c0)
        )
        self.logit_bias = nn.Parameter(torch.full((1,), -2.0))
        self.modality_norm = nn.LayerNorm(total)
        self.modality_head = nn.Sequential(
            nn.Linear(total, total), nn.GELU(), nn.Linear(total, len(self.modality_names))
        )
        rows = torch.full((self.num_targets,), -1, dtype=torch.long)
        row = 1
        for t in self.tasks:
            rows[t["target_offset"] : t["target_offset"] + t["num_targets"]] = torch.arange(row, row + t["num_targets"])
            row += t["num_targets"]
        # global target id -> row of the stage task tables (0 = null); -1 for ids no task owns
        self.register_buffer("target_rows", rows, persistent=False)

    def _check_tables(self) -> None:
        if not self.tasks:
            raise ValueError("Hermes needs at least one task.")
        if not self.modality_names:
            raise ValueError("Hermes needs at least one modality.")
        names = [t["name"] for t in self.tasks]
        keys = [_key(n) for n in names]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"task names {names} must be distinct (after replacing characters other than [A-Za-z0-9_])."
            )
        mkeys = [_key(m) for m in self.modality_names]
        if len(set(mkeys)) != len(mkeys):
            raise ValueError(f"modality names {self.modality_names} must be distinct.")
        used: dict[int, str] = {}
        for t in self.tasks:
            if t["num_targets"] < 1 or t["target_offset"] < 0:
                raise ValueError(f"task {t['name']!r}: needs num_targets >= 1 and target_offset >= 0, got {t}.")
            if not 0 <= t["modality"] < len(self.modality_names):
                raise ValueError(
                    f"task {t['name']!r}: modality {t['modality']} is not an index into {self.modality_names}."
                )
            for g in range(t["target_offset"], t["target_offset"] + t["num_targets"]):
                if g in used:
                    raise ValueError(f"target id {g} is used by tasks {used[g]!r} and {t['name']!r}.")
                used[g] = t["name"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_catalog(
        cls, catalog: Any, patch_size: Sequence[int] | None = None, default_task: int | str = 0, **kwargs: Any
    ) -> Hermes:
        """Build Hermes for a :class:`~uniseg_components.tasks.TaskCatalog` with the catalog's plan.

        Args:
            catalog: the task catalog (3D tasks only; use ``catalog.select(dims=3)``).
            patch_size: replaces the plan's training patch, default ``None``.
            default_task: name or id of the dataset whose targets ``forward(x)`` segments, default ``0``.
            kwargs: ``fusion_stages``, ``blocks_per_stage``, ``modality_tokens``, ``head_dim``, ``mlp_ratio``;
                any other keyword replaces a plan field (``features``...).

        Raises:
            ValueError: the catalog has 2D tasks.
        """
        own = {"fusion_stages", "blocks_per_stage", "modality_tokens", "head_dim", "mlp_ratio"}
        net_kw = {k: v for k, v in kwargs.items() if k in own}
        plan_kw = {k: v for k, v in kwargs.items() if k not in own}
        tasks, modalities = hermes_tables(catalog)
        plan = plan_from_catalog(catalog, patch_size=patch_size, **plan_kw)
        return cls(plan, tasks, modalities, catalog.channel_counts, **net_kw).bind_task(catalog[default_task].id)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network without the catalog (stored in checkpoints)."""
        return {
            "name": type(self).__name__,
            "plan": self.plan.to_dict(),
            "tasks": [dict(t) for t in self.tasks],
            "modalities": list(self.modality_names),
            "in_channels": list(self.backbone.in_channels),
            "fusion_stages": list(self.fusion_stages),
            "blocks_per_stage": list(self.blocks_per_stage),
            "modality_tokens": self.modality_tokens,
            "head_dim": self.head_dim,
            "mlp_ratio": self.mlp_ratio,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Hermes:
        """Rebuild a network from :attr:`config`."""
        kw = {k: config[k] for k in ("fusion_stages", "blocks_per_stage", "modality_tokens", "head_dim", "mlp_ratio")}
        return cls(
            UNetPlan.from_dict(config["plan"]), config["tasks"], config["modalities"], config["in_channels"], **kw
        )

    # ------------------------------------------------------------------ tables
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_targets(self) -> int:
        """One more than the largest global target id (ids no task owns are invalid)."""
        return max(t["target_offset"] + t["num_targets"] for t in self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def stage_channels(self, stage: str) -> int:
        """Channels of the features at a fusion stage name (``"enc2"``, ``"dec0"``...)."""
        n, f = self.plan.num_stages, self.plan.features
        return f[int(stage[3:])] if stage.startswith("enc") else f[n - 2 - int(stage[3:])]

    def _task(self, task_id: int) -> dict[str, Any]:
        if not 0 <= int(task_id) < self.num_tasks:
            raise ValueError(
                f"task_id {task_id} is out of range: this network has {self.num_tasks} tasks (0..{self.num_tasks - 1})."
            )
        return self.tasks[int(task_id)]

    def task_targets(self, task_id: int) -> list[int]:
        """Global target ids of a task's foreground classes, in class order."""
        t = self._task(task_id)
        return list(range(t["target_offset"], t["target_offset"] + t["num_targets"]))

    def task_modality(self, task_id: int) -> int:
        """The modality class of a task."""
        return int(self._task(task_id)["modality"])

    def task_channels(self, task_id: int) -> int:
        """The input channel count of a task (one per modality of its modality combination)."""
        return len(self.modality_names[self.task_modality(task_id)].split("+"))

    def request(self, task_ids: Sequence[int] | int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The request for samples of datasets ``task_ids`` (one per sample; an int is one sample).

        Returns:
            ``task_ids`` ``(B, n)`` long (each sample's targets, padded with ``-1`` to the longest list plus one)
            and ``modality_id`` ``(B,)`` long, on the network's device.
        """
        ids = torch.as_tensor(task_ids).reshape(-1).tolist()
        if not ids:
            raise ValueError("request() needs at least one task id.")
        targets = [self.task_targets(int(t)) for t in ids]
        n = max(len(t) for t in targets) + 1
        dev = self.logit_bias.device
        req = torch.tensor([t + [-1] * (n - len(t)) for t in targets], dtype=torch.long, device=dev)
        mod = torch.tensor([self.task_modality(int(t)) for t in ids], dtype=torch.long, device=dev)
        return req, mod

    # ------------------------------------------------------------------ forward
    def _check_request(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> None:
        b = x.shape[0]
        if task_ids.ndim != 2 or task_ids.shape[0] not in (1, b) or task_ids.shape[1] < 1:
            raise ValueError(
                f"task_ids must be (B, n) or (1, n) with B={b}, n >= 1, got shape {tuple(task_ids.shape)}."
            )
        if modality_id.ndim != 1 or modality_id.shape[0] not in (1, b):
            raise ValueError(f"modality_id must be (B,) or (1,) with B={b}, got shape {tuple(modality_id.shape)}.")
        if task_ids.is_floating_point() or modality_id.is_floating_point():
            raise ValueError("task_ids and modality_id must be integer tensors.")
        in_range = (task_ids >= -1) & (task_ids < self.num_targets)
        known = in_range & ((task_ids == -1) | (self.target_rows[task_ids.clamp(0, self.num_targets - 1)] >= 0))
        if not bool(known.all()):
            bad = sorted(set(task_ids[~known].tolist()))
            raise ValueError(
                f"unknown target id(s) {bad}: this network's targets are "
                + ", ".join(
                    f"{t['name']} {t['target_offset']}..{t['target_offset'] + t['num_targets'] - 1}" for t in self.tasks
                )
                + " (-1 is the null token)."
            )
        m = len(self.modality_names)
        if bool(((modality_id < 0) | (modality_id >= m)).any()):
            raise ValueError(
                f"modality_id {modality_id.tolist()} out of range: this network has {m} modalities "
                f"{self.modality_names}."
            )

    def _tokens(self, stage: str, rows: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        """``(B, n + 1 + l, C)``: requested task tokens, one null token, the modality tokens."""
        pri = self.priors[stage]
        table = pri.task_table()
        task_tok = table[rows]  # (B, n, C)
        null = table[:1].expand(rows.shape[0], 1, table.shape[1])
        mod_tok = pri.modality_table()[modality_id]  # (B, l, C)
        return torch.cat([task_tok, null, mod_tok], dim=1)

    def _fuse(
        self, stage: str, h: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = h.shape
        feats = h.flatten(2).transpose(1, 2)  # (B, L, C)
        for block in self.fusion[stage]:
            tokens, feats = block(tokens, feats, token_mask)
        return tokens, feats.transpose(1, 2).reshape(shape)

    def _resolve(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | Sequence[Sequence[int]] | None,
        modality_id: torch.Tensor | Sequence[int] | int | None,
        task_id: int | torch.Tensor | Sequence[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
        b = x.shape[0]
        if task_id is not None:
            if task_ids is not None or modality_id is not None:
                raise ValueError("pass either task_id or task_ids and modality_id, not both.")
            ids = torch.as_tensor(task_id).reshape(-1).tolist()
            if len(ids) not in (1, b):
                raise ValueError(f"task_id has {len(ids)} entries for a batch of {b}.")
            ids = ids * b if len(ids) == 1 else ids
            req, mod = self.request(ids)
            return req.to(x.device), mod.to(x.device), [self.tasks[int(t)]["num_targets"] for t in ids]
        if task_ids is None or modality_id is None:
            raise ValueError("Hermes needs task_ids (B, n) and modality_id (B,), or task_id (a dataset id).")
        req = torch.as_tensor(task_ids, device=x.device)
        mod = torch.as_tensor(modality_id, device=x.device).reshape(-1)
        return req, mod, None

    def forward(
        self,
        x: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        modality_id: torch.Tensor | None = None,
        *,
        task_id: int | torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Segment the requested targets of ``x``.

        Args:
            x: ``(B, C, D1, D2, D3)``, ``C`` one of the stems' channel counts, spatial size divisible by the total
                stride.
            task_ids: ``(B, n)`` or ``(1, n)`` long global target ids, ``-1`` for padding.
            modality_id: ``(B,)`` or ``(1,)`` long modality class.
            task_id: instead of the two above, a dataset id (int or ``(B,)``): its targets and modality. With none
                of the three: :attr:`default_task`'s targets and modality.

        Returns:
            eval: logits ``(B, n, *spatial)`` (``task_id=``: only the dataset's own targets); training: a dict
            ``{"pred", "modality", "task_ids", "modality_id"}`` (see the class docstring).

        Raises:
            ValueError: 2D input, wrong channel count, unknown target id, modality or task id out of range.
        """
        if x.ndim != 5:
            raise ValueError(
                f"Hermes is a 3D model and expects input (B, C, X, Y, Z), got a {x.ndim - 2}D input of shape "
                f"{tuple(x.shape)}."
            )
        if task_id is None and task_ids is None and modality_id is None:
            task_id = self.default_task
        req, mod, own = self._resolve(x, task_ids, modality_id, task_id)
        self._check_request(x, req, mod)
        b = x.shape[0]
        req = req.expand(b, -1) if req.shape[0] == 1 else req
        mod = mod.expand(b) if mod.shape[0] == 1 else mod
        n = req.shape[1]
        rows = torch.where(req < 0, torch.zeros_like(req), self.target_rows[req.clamp(min=0)])
        pad = req < 0
        token_mask = torch.cat([pad, torch.zeros(b, 1 + self.modality_tokens, dtype=torch.bool, device=x.device)], 1)
        token_bias = key_padding_bias(token_mask)  # once for every fusion block
        posterior: dict[str, torch.Tensor] = {}

        def fusion_hook(prefix: str):
            def hook(stage: int, h: torch.Tensor) -> torch.Tensor:
                name = f"{prefix}{stage}"
                if name not in self.fusion:
                    return h
                tokens, h = self._fuse(name, h, self._tokens(name, rows, mod), token_bias)
                posterior[name] = tokens
                return h

            return hook

        skips = self.backbone.encode(x, hook=fusion_hook("enc"))
        feats = self.backbone.decode(skips, hook=fusion_hook("dec"))
        post = torch.cat([posterior[s] for s in self.fusion_stages], dim=-1)  # (B, n + 1 + l, sum C)
        protos = self.prototype_mlp(self.prototype_norm(post[:, :n]))  # (B, n, C0)
        logits = torch.einsum("bnc,bc...->bn...", protos, feats) + self.logit_bias
        if self.training:
            mod_feat = self.modality_norm(post[:, n + 1 :]).mean(dim=1)
            return {"pred": logits, "modality": self.modality_head(mod_feat), "task_ids": req, "modality_id": mod}
        if own is not None:
            k = max(own)
            logits = logits[:, :k]
            if min(own) < k:  # a batch mixing datasets: other samples' extra channels are padding
                keep = torch.arange(k, device=x.device)[None] < torch.tensor(own, device=x.device)[:, None]
                logits = logits.masked_fill(~keep.reshape(b, k, 1, 1, 1), -1e4)
        return logits

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` (MONAI's ``ckpt_export network_def``): one trace per input stem taking
        ``(x, task_ids=None, modality_id=None)``, the request defaulting to :attr:`default_task`'s (see
        :func:`~uniseg_components.methods.hermes.export.scriptable_hermes`)."""
        from .export import scriptable_hermes

        return scriptable_hermes(self)

    def modality_logits(self, x: torch.Tensor, task_ids: torch.Tensor, modality_id: torch.Tensor) -> torch.Tensor:
        """Modality classification ``(B, M)`` for a request (runs the network in training-output mode)."""
        was = self.training
        self.train()
        try:
            return self(x, task_ids, modality_id)["modality"]  # type: ignore[index]
        finally:
            self.train(was)

    # ------------------------------------------------------------------ incremental tasks
    def add_tasks(self, catalog: Any) -> Hermes:
        """A Hermes for an extended catalog, with every existing weight copied.

        Args:
            catalog: a catalog whose first tasks are this network's tasks (same names, targets, target offsets
                and modalities, in the same order) followed by the new tasks.

        Returns:
            a new network: new task tokens at every fusion stage for the new tasks, new modality tokens (and a
            wider modality classifier whose old rows are copied) for new modality combinations, a new stem for a
            new channel count; the rest is the same plan and settings with this network's weights. Train only
            :meth:`new_parameters` (old frozen) or the old ones at a lower learning rate
            (``uniseg_components.incremental.param_groups``).

        Raises:
            ValueError: the catalog does not start with this network's tasks, or has 2D tasks.
        """
        tasks, modalities = hermes_tables(catalog)
        old = self.tasks
        if len(tasks) <= len(old):
            raise ValueError(
                f"catalog {catalog.name!r} has {len(tasks)} task(s); add_tasks needs this network's {len(old)} "
                f"tasks {self.task_names} followed by at least one new task."
            )
        for o, t in zip(old, tasks):
            got = (t["name"], t["num_targets"], t["target_offset"], modalities[t["modality"]])
            want = (o["name"], o["num_targets"], o["target_offset"], self.modality_names[o["modality"]])
            if got != want:
                raise ValueError(
                    f"catalog {catalog.name!r} must start with this network's tasks in order; task {t['name']!r} "
                    f"(targets {got[1]}, offset {got[2]}, modality {got[3]!r}) does not match "
                    f"{o['name']!r} (targets {want[1]}, offset {want[2]}, modality {want[3]!r})."
                )
        if modalities[: len(self.modality_names)] != self.modality_names:
            raise ValueError(f"catalog modalities {modalities} must start with {self.modality_names}.")
        channels = sorted(set(self.backbone.in_channels) | set(catalog.channel_counts))
        cfg = self.config
        kw = {k: cfg[k] for k in ("fusion_stages", "blocks_per_stage", "modality_tokens", "head_dim", "mlp_ratio")}
        new = type(self)(self.plan, tasks, modalities, channels, **kw).to(self.logit_bias.device)
        state = new.state_dict()
        old_state = self.state_dict()
        for k, v in old_state.items():
            if state[k].shape == v.shape:
                state[k] = v.clone()
            else:  # the modality classifier grew: copy the old classes' rows
                state[k][: v.shape[0]] = v
        new.load_state_dict(state)
        return new

    def new_parameter_names(self, old_tasks: Sequence[str]) -> list[str]:
        """Names of the parameters that belong to tasks outside ``old_tasks``.

        These are the new tasks' tokens (every stage), tokens of modalities no old task uses, stems of channel
        counts no old task uses, and the modality classifier when new modalities exist (it needs the new classes;
        it does not affect the segmentation). Everything else is *old*.

        Raises:
            ValueError: a name in ``old_tasks`` is not a task of this network.
        """
        unknown = [n for n in old_tasks if n not in self.task_names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this network's tasks are {self.task_names}.")
        old = [t for t in self.tasks if t["name"] in set(old_tasks)]
        new_tasks = {_key(t["name"]) for t in self.tasks if t["name"] not in set(old_tasks)}
        old_mods = {t["modality"] for t in old}
        new_mods = {_key(m) for i, m in enumerate(self.modality_names) if i not in old_mods}
        old_channels = {self.task_channels(i) for i, t in enumerate(self.tasks) if t["name"] in set(old_tasks)}
        names = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "priors" and parts[2] == "tasks" and parts[3] in new_tasks:
                names.append(name)
            elif parts[0] == "priors" and parts[2] == "modalities" and parts[3] in new_mods:
                names.append(name)
            elif parts[:2] == ["backbone", "stems"] and int(parts[2]) not in old_channels:
                names.append(name)
            elif parts[0] == "modality_head" and new_mods:
                names.append(name)
        return names

    def new_parameters(self, old_tasks: Sequence[str]) -> list[nn.Parameter]:
        """The parameters of :meth:`new_parameter_names`."""
        names = set(self.new_parameter_names(old_tasks))
        return [p for n, p in self.named_parameters() if n in names]

    def old_parameters(self, old_tasks: Sequence[str]) -> list[nn.Parameter]:
        """Every parameter not in :meth:`new_parameter_names` (backbone, fusion, heads, old tokens)."""
        names = set(self.new_parameter_names(old_tasks))
        return [p for n, p in self.named_parameters() if n not in names]

    @staticmethod
    def freeze_old(model: Hermes, old_tasks: Sequence[str]) -> list[nn.Parameter]:
        """``requires_grad_(False)`` on the old parameters of ``model``; returns the trainable (new) ones."""
        for p in model.old_parameters(old_tasks):
            p.requires_grad_(False)
        return model.new_parameters(old_tasks)

# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""MedUniSeg: one prompt-driven universal model for 2D and 3D tasks (Ye et al., arXiv 2410.05905).

The authors' code is not public; the paper's abstract fixes the ingredients (modal-specific prompts, one
universal task prompt, the MMap and FUSE modules, priors at the start and the end of the encoder, 2D and 3D
tasks in one model, MedUniSeg* freezing the model and adding modules for chosen tasks). Everything else here is
this project's design, documented in :class:`MedUniSeg` and :class:`MedUniSegStar` and in
``bundles/meduniseg_universal_segmentation/docs/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks import eval_mode
from monai.networks.layers import Conv
from torch import nn
from torch.func import functional_call

from ...networks.backbone import UNetBackbone
from ...networks.blocks import DefaultTask, FusePromptModule, conv_norm_act, init_he, task_index
from ...networks.plans import UNetPlan, plan_from_catalog
from ...tasks import MODALITIES

__all__ = ["MMap", "MedUniSeg", "flat_plan", "twin_tensors", "call_twin"]


def _resize(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(N, C, *grid)`` prompt to ``size`` (trilinear or bilinear); unchanged when already that size."""
    if tuple(t.shape[2:]) == tuple(size):
        return t
    mode = "trilinear" if t.ndim == 5 else "bilinear"
    return F.interpolate(t, size=tuple(size), mode=mode, align_corners=False)


def flat_plan(plan: UNetPlan) -> UNetPlan:
    """The in-plane (2D) part of a 3D plan: first two axes of the patch, kernels and strides."""
    return UNetPlan(
        spatial_dims=2,
        patch_size=plan.patch_size[:2],
        features=plan.features,
        kernel_sizes=tuple(k[:2] for k in plan.kernel_sizes),
        strides=tuple(s[:2] for s in plan.strides),
        decoder_kernel_sizes=tuple(k[:2] for k in plan.decoder_kernel_sizes),  # type: ignore[union-attr]
        n_conv_per_stage=plan.n_conv_per_stage,
        n_conv_per_stage_decoder=plan.n_conv_per_stage_decoder,
        deep_supervision=plan.deep_supervision,
        negative_slope=plan.negative_slope,
    )


def _twin_recipe(source: nn.Module, twin: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """How each tensor of ``twin`` is taken from ``source`` (see :func:`twin_tensors`): ``(name, kind, source
    shape)`` with kind ``"same"``, ``"centre"`` (the central depth tap of a convolution weight) or ``"mean"`` (the
    mean over depth).

    Raises:
        ValueError: the twin has a tensor the source lacks, or one whose shape cannot be derived from the source's.
    """
    src = dict(source.named_parameters())
    src.update(source.named_buffers())
    recipe = []
    for prefix, module in twin.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, t in own:
            name = f"{prefix}.{pname}" if prefix else pname
            if name not in src:
                raise ValueError(f"the 2D twin has {name!r}, which the 3D network lacks.")
            s = src[name]
            if s.shape == t.shape:
                kind = "same"
            elif s.ndim == t.ndim + 1 and isinstance(module, (nn.Conv2d, nn.Conv1d)) and pname == "weight":
                kind = "centre"
            elif s.ndim == t.ndim + 1:  # transposed convolutions and prompts on a 3D grid
                kind = "mean"
            else:
                raise ValueError(f"{name!r}: cannot map the 3D shape {tuple(s.shape)} to {tuple(t.shape)}.")
            recipe.append((name, kind, tuple(s.shape)))
    return recipe


def twin_tensors(source: nn.Module, twin: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a 2D ``twin`` runs on, taken from the 3D ``source`` network with the same module names.

    For a 2D image (a depth-1 volume) the 3D network's operations reduce to 2D ones on views of its own weights:

    * a convolution with same padding only meets the image with its central depth tap: ``weight[..., k // 2]``;
    * a transposed convolution (kernel = stride) whose depth output is averaged back to one slice: the mean of
      its depth taps, ``weight.mean(-1)``;
    * prompts stored on a 3D grid: their mean over depth;
    * everything else (biases, norms, linear layers, buffers) as it is.

    Which of these applies to each tensor is worked out once and kept on ``twin`` with the source shapes it was
    worked out for (worked out again for a source whose shapes differ), so a call costs one pass over the tensors
    instead of a walk of the twin's modules (the 2D path calls it on every forward pass).

    The returned tensors are views of (or computed from) ``source``'s parameters, so gradients reach them.

    Raises:
        ValueError: the twin has a tensor the source lacks, or one whose shape cannot be derived from the source's.
    """
    src = dict(source.named_parameters())
    src.update(source.named_buffers())
    recipe = twin.__dict__.get("_twin_recipe")
    if recipe is None or any(name not in src or tuple(src[name].shape) != shape for name, _, shape in recipe):
        recipe = twin.__dict__["_twin_recipe"] = _twin_recipe(source, twin)
    out: dict[str, torch.Tensor] = {}
    for name, kind, _ in recipe:
        s = src[name]
        out[name] = s if kind == "same" else s.select(-1, s.shape[-1] // 2) if kind == "centre" else s.mean(dim=-1)
    return out


class _Call(nn.Module):
    """``forward`` calls ``module.<method>`` (so that ``functional_call`` can run any method of a module)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


def call_twin(source: nn.Module, twin: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``twin.<method>(*args, **kwargs)`` on the tensors of ``source`` (see :func:`twin_tensors`); the twin's
    own parameters (kept on the ``meta`` device) are never used."""
    tensors = {f"module.{k}": v for k, v in twin_tensors(source, twin).items()}
    return functional_call(_Call(twin, method), tensors, args, kwargs)


class _ResidualTanhGate(torch.autograd.Function):
    """``(features * (1 + tanh(a)), mean(a) over space)`` for training, with a hand-written backward pass.

    What autograd builds for these expressions runs four full-resolution kernels forward and five backward, and keeps
    ``1 + tanh(a)`` for the backward pass as well as ``tanh(a)``. This runs three forward (``tanh``, ``addcmul``,
    ``mean``) and four backward (``addcmul``, a product, ``tanh_backward``, one in-place broadcast add for the mean)
    and keeps ``features`` and ``tanh(a)`` only. The values are those of :func:`_gate` (the same forward kernels).
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tanh(a)
        ctx.save_for_backward(features, t)
        ctx.a_dtype = a.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a full-size zero tensor
        return torch.addcmul(features, features, t), a.mean(dim=tuple(range(2, a.ndim)))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_prior: torch.Tensor | None) -> tuple[Any, Any]:
        if torch.is_grad_enabled():  # create_graph=True: the saved tanh(a) has no graph, so refuse, not answer wrong
            raise RuntimeError(
                "MedUniSeg's MMap gate has no second derivative in training mode (backward with create_graph=True)."
            )
        features, t = ctx.saved_tensors
        grad_features = grad_a = None
        if grad_out is not None and ctx.needs_input_grad[0]:
            grad_features = torch.addcmul(grad_out, grad_out, t.to(grad_out.dtype))
        if not ctx.needs_input_grad[1]:
            return grad_features, None
        if grad_out is not None:
            grad_a = torch.ops.aten.tanh_backward(grad_out * features, t.to(grad_out.dtype)).to(ctx.a_dtype)
        if grad_prior is not None:
            shape = (*grad_prior.shape, *([1] * (t.ndim - 2)))
            spread = (grad_prior / t[0, 0].numel()).reshape(shape).to(ctx.a_dtype)
            grad_a = spread.expand(t.shape).contiguous() if grad_a is None else grad_a.add_(spread)
        return grad_features, grad_a


def _gate(features: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MMap's residual gate and pooled map: ``features * (1 + tanh(a))`` (computed as ``features + features *
    tanh(a)``) and ``mean(a)`` over space; through :class:`_ResidualTanhGate` when a gradient is needed (and not
    while ``torch.jit`` traces: export keeps plain operations).

    Shapes: ``features`` and ``a`` ``(B, C, *s)``; returns ``(B, C, *s)`` and ``(B, C)``.
    """
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or a.requires_grad)
    if needs_grad and not torch.jit.is_tracing() and not torch.jit.is_scripting():
        return _ResidualTanhGate.apply(features, a)
    return torch.addcmul(features, features, torch.tanh(a)), a.mean(dim=tuple(range(2, a.ndim)))


class MMap(nn.Module):
    """The modal map: turns the modal prompt of the input and the first-stage features into a modal prior.

    ``A = conv1x1(conv-IN-LeakyReLU([F0, P]))`` with ``F0`` the stage-0 features and ``P`` the modal prompt
    resized to them; the features leave as ``F0 * (1 + tanh(A))`` (a residual gate: the last conv starts at
    zero, so a fresh MMap is the identity) and the pooled map ``mean(A)`` over space is the modal prior vector
    handed to FUSE.

    Args:
        spatial_dims: 2 or 3.
        feature_channels: channels of the stage-0 features ``F0``.
        prompt_channels: channels of the modal prompt ``P``.
        kernel_size: kernel of the conv block, default 3 (the plan's stage-0 kernel is used by MedUniSeg).

    Shapes: ``forward(features (B, C0, *s), prompt (B, P, *s))`` returns ``(features (B, C0, *s), prior (B, C0))``.
    """

    def __init__(
        self, spatial_dims: int, feature_channels: int, prompt_channels: int, kernel_size: Sequence[int] | int = 3
    ) -> None:
        super().__init__()
        self.block = conv_norm_act(spatial_dims, feature_channels + prompt_channels, feature_channels, kernel_size)
        self.out = Conv[Conv.CONV, spatial_dims](feature_channels, feature_channels, 1)
        self.block.apply(init_he)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.out(self.block(torch.cat([features, prompt], dim=1)))
        return _gate(features, a)


class MedUniSeg(DefaultTask, nn.Module):
    """MedUniSeg: a plan-driven U-Net driven by modal-specific prompts (encoder start) and a universal task prompt
    (encoder end), for 2D and 3D tasks with the same parameters.

    Design (this project's; the paper publishes only the ingredients):

    * **2D and 3D in one model.** The network is built from a 3D plan, and a 2D image ``(B, C, H, W)`` is
      treated as a depth-1 volume: with same padding a 3x3x3 kernel only meets it with its central depth slice,
      a stride of 2 keeps depth 1, and the transposed convolutions (kernel = stride) are averaged back to one
      slice, i.e. use the mean of their depth taps. Rather than paying for 27-tap convolutions of which 18 see
      padding, the 2D path runs exactly those reduced operations as real 2D ones: a 2D twin of the network
      (same module names, built on the plan's in-plane part, no weights of its own) is called on views of
      this network's weights (:func:`twin_tensors`). So 2D samples train the in-plane part of every kernel,
      2D and 3D batches update the same parameters, and the output of a 2D input is 2D. Batches hold one task
      (so one dimensionality); the task-balanced sampler alternates 2D and 3D batches.
    * **Modal-specific prompts and MMap.** One learnable prompt per modality of the catalog, shape
      ``(modal_prompt_channels, *modal_grid)`` (default 8 channels on a 4x4x4 grid), resized to the stage-0
      feature size, so it does not depend on the patch. A multi-channel input (PET/CT, the four BraTS sequences,
      RGB) takes the mean of its channels' prompts. :class:`MMap` turns the prompt and the stage-0 features into
      a modal prior: it gates the stage-0 features (the prior injected at the start of the encoder: stage 1 and
      the skip connection see the gated features) and yields a pooled prior vector.
    * **Universal task prompt and FUSE.** As UniSeg: a ``(1, T, *bottleneck)`` prompt (resized when the
      bottleneck differs, e.g. for 2D inputs) concatenated with the bottleneck features and, to couple the two
      priors, with the modal prior vector projected to ``modal_prior_channels`` (default 8) channels and
      broadcast over space. :class:`~uniseg_components.networks.uniseg.FusePromptModule` maps them to one prior
      per task; the current task's channel joins the decoder input (the prior at the end of the encoder).
    * **Heads.** Shared heads with ``max(num_classes)`` channels sliced to the task's classes (softmax over the
      task's own classes), with deep supervision, as UniSeg.

    Args:
        plan: a 3D backbone plan (a 2D plan makes a 2D-only model).
        num_classes: classes per task (background included), in task-id order.
        task_modalities: per task, the modality name of each input channel (e.g. ``[["CT"], ["CT", "PET"]]``).
        task_dims: per task, 2 or 3; default ``None`` = ``plan.spatial_dims`` for all.
        in_channels: input channel counts to build stems for, default: those of ``task_modalities``.
        modal_prompt_channels: channels of each modal prompt, default 8.
        modal_grid: grid the modal prompts are stored on, default 4 per axis.
        modal_prior_channels: channels of the modal prior given to FUSE, default 8.

    Shapes:
        ``forward(x, task_id)``: ``x`` is ``(B, C, X, Y, Z)`` for a 3D task or ``(B, C, X, Y)`` for a 2D task (in-plane
        sizes divisible by the plan's in-plane total stride); returns logits ``(B, num_classes[task], *spatial)``
        (a list per decoder stage in training with deep supervision).

    Example::

        catalog = TaskCatalog.builtin("demo")
        net = MedUniSeg.from_catalog(catalog).eval()
        net(torch.zeros(1, 1, 96, 96), task_id=catalog["fetal_us"].id).shape  # (1, 2, 96, 96)
    """

    def __init__(
        self,
        plan: UNetPlan,
        num_classes: Sequence[int],
        task_modalities: Sequence[Sequence[str]],
        task_dims: Sequence[int] | None = None,
        in_channels: Sequence[int] | None = None,
        modal_prompt_channels: int = 8,
        modal_grid: Sequence[int] | int = 4,
        modal_prior_channels: int = 8,
    ) -> None:
        super().__init__()
        if not num_classes or any(int(k) < 2 for k in num_classes):
            raise ValueError(f"num_classes needs one entry >= 2 per task (background + foreground), got {num_classes}.")
        if len(task_modalities) != len(num_classes):
            raise ValueError(
                f"task_modalities needs one entry per task ({len(num_classes)}), got {len(task_modalities)}."
            )
        unknown = sorted({m for mods in task_modalities for m in mods} - set(MODALITIES))
        if unknown or any(len(m) == 0 for m in task_modalities):
            raise ValueError(
                f"task_modalities must list known modalities per input channel; unknown {unknown}, "
                f"known {sorted(MODALITIES)}."
            )
        dims = plan.spatial_dims
        task_dims = [dims] * len(num_classes) if task_dims is None else [int(d) for d in task_dims]
        if len(task_dims) != len(num_classes) or any(d not in (2, dims) for d in task_dims):
            raise ValueError(f"task_dims must hold 2 or {dims} per task for a {dims}D plan, got {task_dims}.")
        self.plan = plan
        self.num_classes = [int(k) for k in num_classes]
        self.num_tasks = len(self.num_classes)
        self.task_modalities = [list(m) for m in task_modalities]
        self.task_dims = task_dims
        self.modalities = list(dict.fromkeys(m for mods in self.task_modalities for m in mods))
        channels = sorted({len(m) for m in self.task_modalities}) if in_channels is None else in_channels
        self.modal_prompt_channels = int(modal_prompt_channels)
        grid = [int(modal_grid)] * dims if isinstance(modal_grid, int) else [int(g) for g in modal_grid]
        self.modal_grid = grid
        self.modal_prior_channels = int(modal_prior_channels)
        f = plan.features

        self.backbone = UNetBackbone(plan, channels, max(self.num_classes), decoder_extra_channels=1)
        self.modal_prompts = nn.Parameter(torch.randn(len(self.modalities), self.modal_prompt_channels, *grid))
        self.mmap = MMap(dims, f[0], self.modal_prompt_channels, plan.kernel_sizes[0])
        self.modal_to_fuse = nn.Linear(f[0], self.modal_prior_channels)
        self.prompt = nn.Parameter(torch.randn(1, self.num_tasks, *plan.bottleneck_size()))
        self.fuse = FusePromptModule(dims, f[-1] + self.modal_prior_channels, self.num_tasks)
        self.fuse.apply(init_he)
        # (T, M): the weights of each modal prompt in a task's input (mean over its channels)
        mix = torch.zeros(self.num_tasks, len(self.modalities))
        for t, mods in enumerate(self.task_modalities):
            for m in mods:
                mix[t, self.modalities.index(m)] += 1.0 / len(mods)
        self.register_buffer("modal_mix", mix, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_catalog(
        cls, catalog: Any, patch_size: Sequence[int] | None = None, default_task: int | str = 0, **kwargs: Any
    ) -> MedUniSeg:
        """Build MedUniSeg for every task (2D and 3D) of a :class:`~uniseg_components.tasks.TaskCatalog`.

        Args:
            catalog: the task catalog (object, JSON path or built-in name); its plan must be 3D when it has 3D tasks.
            patch_size: replaces the plan's 3D training patch; the task prompt follows it.
            default_task: name or id of the task ``forward(x)`` segments, default ``0``.
            kwargs: :class:`MedUniSeg` arguments (``modal_prompt_channels``...) or plan fields to override
                (``features``, ``deep_supervision``...).
        """
        from ...tasks import TaskCatalog

        catalog = TaskCatalog.resolve(catalog)
        own = {"modal_prompt_channels", "modal_grid", "modal_prior_channels"}
        net_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        plan = plan_from_catalog(catalog, patch_size=patch_size, **kwargs)
        if 3 in catalog.dims and plan.spatial_dims != 3:
            raise ValueError(f"catalog {catalog.name!r} has 3D tasks but its plan is {plan.spatial_dims}D.")
        for t in catalog:
            if t.dims == 2:  # the in-plane part of the plan must divide the 2D patch
                ts = plan.total_stride[:2]
                if any(p % s for p, s in zip(t.patch_size, ts)):
                    raise ValueError(
                        f"task {t.name!r}: 2D patch {list(t.patch_size)} is not divisible by the plan's in-plane "
                        f"total stride {list(ts)}."
                    )
        return cls(
            plan,
            catalog.num_classes,
            [list(t.modalities) for t in catalog],
            task_dims=[t.dims for t in catalog],
            in_channels=catalog.channel_counts,
            **net_kw,
        ).bind_task(catalog[default_task].id)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network (stored in checkpoints, see :meth:`from_config`)."""
        return {
            "name": "MedUniSeg",
            "plan": self.plan.to_dict(),
            "num_classes": list(self.num_classes),
            "task_modalities": [list(m) for m in self.task_modalities],
            "task_dims": list(self.task_dims),
            "in_channels": list(self.backbone.in_channels),
            "modal_prompt_channels": self.modal_prompt_channels,
            "modal_grid": list(self.modal_grid),
            "modal_prior_channels": self.modal_prior_channels,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MedUniSeg:
        """Rebuild a network from :attr:`config`."""
        kw = {k: v for k, v in config.items() if k not in ("name", "plan")}
        return cls(UNetPlan.from_dict(config["plan"]), **kw)

    # ------------------------------------------------------------------ pieces
    def input_rank(self, x: torch.Tensor, task: int | None = None) -> int:
        """The spatial rank (2 or 3) of ``x``, checked against the plan and, when given, the task's rank."""
        dims = self.plan.spatial_dims
        if x.ndim == dims + 2:
            got = dims
        elif x.ndim == 4 and dims == 3:
            got = 2
        else:
            raise ValueError(
                f"MedUniSeg expects (B, C, X, Y) 2D or (B, C, X, Y, Z) 3D input for its {dims}D plan, got shape "
                f"{tuple(x.shape)}."
            )
        if task is not None and self.task_dims[task] != got:
            raise ValueError(
                f"task {task} is {self.task_dims[task]}D but the input is {got}D (shape {tuple(x.shape)})."
            )
        return got

    def flat_twin(self) -> MedUniSeg:
        """The 2D twin that runs 2D inputs (built once, on the ``meta`` device: it holds no weights)."""
        twin = self.__dict__.get("_twin")
        if twin is None:
            cfg = self.config
            twin = MedUniSeg(
                flat_plan(self.plan),
                self.num_classes,
                self.task_modalities,
                in_channels=cfg["in_channels"],
                modal_prompt_channels=self.modal_prompt_channels,
                modal_grid=self.modal_grid[:2],
                modal_prior_channels=self.modal_prior_channels,
            ).to("meta")
            self.__dict__["_twin"] = twin
        twin.train(self.training)
        return twin

    def runs_2d_on_twin(self, x: torch.Tensor, task: int | None = None) -> bool:
        """Whether ``x`` is a 2D input to this 3D-plan model (then the twin runs it)."""
        return self.input_rank(x, task) == 2 and self.plan.spatial_dims == 3

    def modal_prompt(self, task: int | torch.Tensor, size: Sequence[int], batch_size: int) -> torch.Tensor:
        """The modal prompt of a task's input (task id as an int or a ``(1,)`` long tensor, as export traces it),
        resized to ``size``: ``(batch_size, P, *size)``."""
        tid = task if isinstance(task, torch.Tensor) else torch.tensor([task], device=self.modal_mix.device)
        mix = torch.index_select(self.modal_mix, 0, tid.reshape(-1)[:1]).to(self.modal_prompts.dtype)
        prompt = torch.einsum("tm,m...->t...", mix, self.modal_prompts)
        return _resize(prompt, size).expand(batch_size, -1, *size)

    def encode(self, x: torch.Tensor, task: int | torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder with the modal prior after stage 0; returns the skips and the modal prior vector ``(B, C0)``."""
        prior: list[torch.Tensor] = []

        def hook(stage: int, h: torch.Tensor) -> torch.Tensor:
            if stage == 0:
                h, vec = self.mmap(h, self.modal_prompt(task, h.shape[2:], h.shape[0]))
                prior.append(vec)
            return h

        skips = self.backbone.encode(x, hook=hook)
        return skips, prior[0]

    def task_prompts(self, bottleneck: torch.Tensor, modal_prior: torch.Tensor) -> torch.Tensor:
        """All task-specific priors for bottleneck features ``(B, C, *b)`` and the modal prior ``(B, C0)``:
        returns ``(B, T, *b)``."""
        b = bottleneck.shape[2:]
        prompt = self.prompt
        prompt = _resize(prompt, b).expand(bottleneck.shape[0], -1, *b)
        modal = self.modal_to_fuse(modal_prior).reshape(*modal_prior.shape[:1], -1, *([1] * len(b)))
        return self.fuse(torch.cat([bottleneck, modal.expand(-1, -1, *b), prompt], dim=1))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, task_id: int | torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` for one task.

        Args:
            x: ``(B, C, X, Y, Z)`` (3D task) or ``(B, C, X, Y)`` (2D task).
            task_id: an int, or a tensor of per-sample ids that must all be equal; default :attr:`default_task`.

        Returns:
            logits ``(B, num_classes[task_id], *spatial)``, 2D for a 2D input (a list per decoder stage in training
            with deep supervision).

        Raises:
            ValueError: unknown task, mixed tasks, input rank not the task's, unsupported channel count, or a
                spatial size not divisible by the total stride.
        """
        task = task_index(self.default_task if task_id is None else task_id, self.num_tasks, x.shape[0])
        if self.runs_2d_on_twin(x, task):
            return call_twin(self, self.flat_twin(), "forward", x, task)
        skips, modal = self.encode(x, task)
        prompts = self.task_prompts(skips[-1], modal)
        return self.backbone.decode(skips, prompts[:, task : task + 1], head_channels=self.num_classes[task])

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` (MONAI's ``ckpt_export network_def``): one trace per input kind (channel
        count and the plan's patch, its in-plane part for 2D tasks) taking ``(x, task_id=None)`` (``None``:
        :attr:`default_task`); see :func:`~uniseg_components.methods.meduniseg.export.scriptable_meduniseg`. The
        network's training mode is restored afterwards."""
        from .export import MedUniSegExportable, scriptable_meduniseg

        with eval_mode(self):
            return scriptable_meduniseg(MedUniSegExportable(self, self.default_task))

    def forward_all_tasks(
        self, x: torch.Tensor, task_ids: Sequence[int] | None = None
    ) -> list[torch.Tensor | list[torch.Tensor]]:
        """Segment ``x`` for several tasks: the encoder runs once per distinct modal prompt among the tasks (once
        when they share the input's modalities, as ``catalog.tasks_for_channels`` selects), the decoder once per
        task. Outputs equal separate :meth:`forward` calls.

        Args:
            x: ``(B, C, *spatial)``.
            task_ids: tasks to segment, default every task of the input's rank and channel count.

        Returns:
            one output per task in ``task_ids`` order, each as :meth:`forward` would return it.
        """
        if task_ids is None:
            rank = x.ndim - 2
            ids = [
                t
                for t in range(self.num_tasks)
                if self.task_dims[t] == rank and len(self.task_modalities[t]) == x.shape[1]
            ]
        else:
            ids = [task_index(t, self.num_tasks) for t in task_ids]
        for t in ids:
            self.input_rank(x, t)
        if ids and self.runs_2d_on_twin(x):
            return call_twin(self, self.flat_twin(), "forward_all_tasks", x, ids)
        outputs: dict[int, Any] = {}
        groups: dict[tuple[float, ...], list[int]] = {}
        for t in ids:
            groups.setdefault(tuple(self.modal_mix[t].tolist()), []).append(t)
        for members in groups.values():
            skips, modal = self.encode(x, members[0])
            prompts = self.task_prompts(skips[-1], modal)
            for t in members:
                outputs[t] = self.backbone.decode(skips, prompts[:, t : t + 1], head_channels=self.num_classes[t])
        return [outputs[t] for t in ids]

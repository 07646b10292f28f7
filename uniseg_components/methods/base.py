# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The method protocol: everything the generic code (CLI, checkpoints, export, benchmark) needs to know about a
universal segmentation method, in one small class per method.

A method is a unit under ``uniseg_components/methods/<name>/`` holding its networks, the parts that only it needs
(loss, inferers, export wrapper, benchmark, lifecycle such as fine-tuning or adding tasks) and one :class:`Method`
subclass that describes it. The registry (:mod:`uniseg_components.methods`) maps names and network classes to
these objects; nothing outside a unit tests ``isinstance`` against its classes.

What a method provides (``network`` is one of its networks; the engines call ``network(x, task_id=...)``):

=============================  =======================================================================================
building                       :meth:`Method.build` (from a catalog), :meth:`Method.from_config` (a checkpoint's
                               config; ``network.config`` is the other half of the round trip), :meth:`Method.owns`
forward                        the networks' ``forward(x, task_id)``; the all-tasks path is the bundle's
                               ``all_tasks_inferer`` (UniSeg, MedUniSeg: ``network.forward_all_tasks(x, ids)``,
                               encoder once; Hermes: every target in one request)
logits -> labels               :attr:`Method.output` (``"softmax"``: one softmax over the task's classes, or
                               ``"sigmoid"``: one mask per target), :meth:`Method.probabilities`,
                               :meth:`Method.label_map`
training                       :meth:`Method.loss`; the recipe itself is the bundle's ``train.json``
                               (:meth:`Method.bundle_for`, :meth:`Method.bundle_overrides`)
export                         :meth:`Method.torchscript`, :meth:`Method.onnx` (from :meth:`Method.onnx_example`),
                               :meth:`Method.onnx_graphs`
benchmark                      :meth:`Method.run_benchmark`, :meth:`Method.format_benchmark`
=============================  =======================================================================================

Adding a method: a folder with its network(s) and a ``Method`` subclass, and one line in the registry. It can
train and serve through an existing bundle's configs by naming that bundle in :attr:`Method.bundles` and replacing
the method-specific config entries in :meth:`Method.bundle_overrides` (``tests/test_methods.py`` does this with a
dummy method).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed import unwrap
from ..tasks import TaskCatalog

__all__ = ["Method"]


class Method:
    """Base class of a method's description (see the module docstring). Subclasses set the class attributes and
    implement :meth:`build`, :meth:`loss`, the export and the benchmark methods.

    Class attributes:
        name: registry name, lower case (``"uniseg"``); the CLI's ``--method``.
        title: display name (``"UniSeg"``).
        networks: the network classes a checkpoint of this method can name (``config["name"]`` is the class name).
        bundles: network class name -> the bundle folder (under ``bundles/``) whose configs train and serve it.
        output: ``"softmax"`` (logits over each task's classes, background included) or ``"sigmoid"`` (one logit
            map per requested target, no background channel).
        dims: the spatial ranks of the tasks it segments, ``(3,)`` or ``(2, 3)``.
        loss_class: the training loss (:meth:`loss` builds it), default ``None``.
        benchmark: the unit's benchmark module, with ``run_benchmark(catalog, patch_size=, repeats=, device=)`` and
            ``format_report(result)``; default ``None``.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    networks: ClassVar[tuple[type[nn.Module], ...]] = ()
    bundles: ClassVar[Mapping[str, str]] = {}
    output: ClassVar[str] = "softmax"
    dims: ClassVar[tuple[int, ...]] = (3,)
    loss_class: ClassVar[type[nn.Module] | None] = None
    benchmark: ClassVar[ModuleType | None] = None

    # ------------------------------------------------------------------ building
    def build(self, catalog: TaskCatalog, **kwargs: Any) -> nn.Module:
        """The method's main network (the first of :attr:`networks`) for the tasks of ``catalog``:
        ``from_catalog(catalog, **kwargs)``."""
        return self.networks[0].from_catalog(catalog, **kwargs)  # type: ignore[attr-defined]

    def network_class(self, name: str) -> type[nn.Module] | None:
        """The class of this method called ``name``, or ``None``."""
        return next((c for c in self.networks if c.__name__ == name), None)

    def from_config(self, config: Mapping[str, Any]) -> nn.Module:
        """Rebuild a network from its ``config`` (``{"name": class name, ...}``, as checkpoints store it)."""
        cls = self.network_class(str(config.get("name")))
        if cls is None:
            raise ValueError(f"{self.title} has no network {config.get('name')!r}; its networks: {self.network_names}.")
        return cls.from_config(dict(config))  # type: ignore[attr-defined]

    @property
    def network_names(self) -> list[str]:
        return [c.__name__ for c in self.networks]

    def owns(self, network: nn.Module | Mapping[str, Any]) -> bool:
        """Whether ``network`` (a module, possibly DDP-wrapped, or a checkpoint's network config) is this method's."""
        if isinstance(network, Mapping):
            return self.network_class(str(network.get("name"))) is not None
        return isinstance(unwrap(network), self.networks)

    def select_catalog(self, catalog: TaskCatalog) -> TaskCatalog:
        """The tasks of ``catalog`` this method can segment (those of a supported rank), ids renumbered densely."""
        if all(t.dims in self.dims for t in catalog):
            return catalog
        return catalog.select(dims=self.dims[0]) if len(self.dims) == 1 else catalog

    # ------------------------------------------------------------------ outputs
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K, *spatial)`` logits -> probabilities: softmax over channels, or a sigmoid per channel."""
        return torch.sigmoid(logits.float()) if self.output == "sigmoid" else torch.softmax(logits.float(), dim=1)

    def label_map(self, probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """``(B, K, *spatial)`` probabilities -> ``(B, 1, *spatial)`` integer labels: the argmax (softmax methods), or
        for sigmoid outputs 0 where no target reaches ``threshold`` and else the most probable target's channel + 1."""
        best, idx = probabilities.max(dim=1, keepdim=True)
        if self.output == "sigmoid":
            return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))
        return idx

    # ------------------------------------------------------------------ training
    def loss(self, **kwargs: Any) -> nn.Module:
        """The training loss the method's networks' training outputs go into: :attr:`loss_class` ``(**kwargs)``."""
        if self.loss_class is None:
            raise NotImplementedError(f"{self.title} names no loss_class.")
        return self.loss_class(**kwargs)

    def bundle_for(self, network: nn.Module | Mapping[str, Any]) -> str:
        """The bundle folder name whose configs train and serve ``network`` (a module or its config)."""
        name = str(network.get("name")) if isinstance(network, Mapping) else type(unwrap(network)).__name__
        if name not in self.bundles:
            raise ValueError(f"{self.title} has no bundle for network {name!r}; bundles: {dict(self.bundles)}.")
        return self.bundles[name]

    def bundle_overrides(self, job: str) -> dict[str, Any]:
        """Config entries to replace when this method runs through :meth:`bundle_for`'s bundle, for ``job``
        (``"train"``, ``"evaluate"`` or ``"inference"``); default none (the bundle is the method's own)."""
        return {}

    # ------------------------------------------------------------------ export
    def torchscript(
        self, network: nn.Module, catalog: TaskCatalog | None = None, default_task: int | None = None
    ) -> torch.jit.ScriptModule:
        """The TorchScript form of ``network`` (eval mode), taking the task as an input."""
        raise NotImplementedError

    def onnx(
        self,
        network: nn.Module,
        filepath: str | Path,
        catalog: TaskCatalog | None = None,
        channels: int | None = None,
        default_task: int | None = None,
        opset_version: int = 18,
    ) -> Path:
        """One ONNX graph of ``network`` for one input kind (channel count, patch), written to ``filepath``: the
        module, example inputs, input names and dynamic axes of :meth:`onnx_example` through
        :func:`uniseg_components.export.onnx_export` (output ``pred``)."""
        from ..export import onnx_export

        module, inputs, names, axes = self.onnx_example(unwrap(network), catalog, channels, default_task)
        return onnx_export(module, inputs, filepath, names, axes, opset_version)

    def onnx_example(
        self, network: nn.Module, catalog: TaskCatalog | None, channels: int | None, default_task: int | None
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, str]]]:
        """What :meth:`onnx` exports for one input kind (``channels``, or ``default_task``'s): ``(module, example
        inputs, input names, dynamic axes)``."""
        raise NotImplementedError

    def onnx_graphs(self, network: nn.Module, catalog: TaskCatalog) -> dict[str, dict[str, Any]]:
        """The ONNX graphs a release needs: kind name (``"c1"``...) -> keyword arguments of :meth:`onnx`. Default:
        one per input channel count, traced with the first task of that count."""
        out: dict[str, dict[str, Any]] = {}
        for task in catalog:
            out.setdefault(f"c{task.num_channels}", {"channels": task.num_channels, "default_task": task.id})
        return out

    # ------------------------------------------------------------------ benchmark
    def run_benchmark(
        self,
        catalog: TaskCatalog | str | None = None,
        patch_size: Sequence[int] | None = None,
        repeats: int = 3,
        device: str | None = None,
        compile: bool | None = None,
    ) -> dict[str, Any]:
        """Measure the method on this machine (``python -m uniseg_components benchmark``); returns plain data.
        Default: ``run_benchmark`` of the unit's :attr:`benchmark` module. ``compile``: also time the training steps
        compiled (default on CUDA only)."""
        if self.benchmark is None:
            raise NotImplementedError(f"{self.title} has no benchmark.")
        return self.benchmark.run_benchmark(
            catalog, patch_size=patch_size, repeats=repeats, device=device, compile=compile
        )

    def format_benchmark(self, result: Mapping[str, Any]) -> str:
        """A markdown table of :meth:`run_benchmark`'s result (default: the :attr:`benchmark` module's
        ``format_report``)."""
        if self.benchmark is None:
            raise NotImplementedError(f"{self.title} has no benchmark.")
        return self.benchmark.format_report(dict(result))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, networks={self.network_names})"

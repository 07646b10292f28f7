# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The methods, one unit each, and the registry through which the generic code reaches them.

``METHODS`` maps a method's name to its :class:`~uniseg_components.methods.base.Method`; :func:`method_of` finds the
method of a network (or of a checkpoint's network config). A new method is a folder beside ``uniseg/``,
``meduniseg/`` and ``hermes/`` with a ``METHOD`` object, and one entry in the registry line below (or a
:func:`register_method` call at run time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from . import hermes, meduniseg, uniseg
from .base import Method

__all__ = ["Method", "METHODS", "register_method", "unregister_method", "get_method", "method_of"]

#: name -> method, in registration order
METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` under ``method.name``.

    Raises:
        ValueError: the name is empty or taken (unless ``replace``), or a network class name is already another
            method's.
    """
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name.")
    if method.name in METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered: {METHODS[method.name]!r}.")
    for other in METHODS.values():
        shared = set(method.network_names) & set(other.network_names)
        if other.name != method.name and shared:
            raise ValueError(f"network class(es) {sorted(shared)} already belong to method {other.name!r}.")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method from :data:`METHODS` (no error when absent)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}.")
    return METHODS[key]


def method_of(network: nn.Module | Mapping[str, Any]) -> Method:
    """The method that owns ``network`` (a module, possibly DDP-wrapped, or a checkpoint's network config).

    Raises:
        ValueError: no registered method owns it; the message lists every known network.
    """
    for method in METHODS.values():
        if method.owns(network):
            return method
    name = network.get("name") if isinstance(network, Mapping) else type(network).__name__
    known = ", ".join(f"{n} ({m.name})" for m in METHODS.values() for n in m.network_names)
    raise ValueError(f"unknown network {name!r}: no registered method owns it; known networks: {known}.")


# the registry line: one entry per method unit
for _unit in (uniseg, meduniseg, hermes):
    register_method(_unit.METHOD)

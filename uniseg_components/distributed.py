# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""The one distributed set-up of every bundle and the CLI: process group from torchrun's environment, the rank's
device, rank queries, and the one way to reach a network inside its ``DistributedDataParallel`` wrapper.

The backend follows the device (NCCL on CUDA, Gloo on CPU), so the ``multi_gpu_train.json`` overlays run unchanged
with two CPU processes in the tests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "distributed_backend",
    "init_distributed",
    "distributed_device",
    "ddp_device_ids",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "shutdown_distributed",
    "shard",
    "unwrap",
    "wait_for_file",
]

logger = logging.getLogger(__name__)


def distributed_backend(device: str | torch.device | None = None) -> str:
    """``"nccl"`` when ``device`` is CUDA (default: when CUDA is available), else ``"gloo"``."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def get_rank() -> int:
    """Rank in the process group, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """World size of the process group, else ``$WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and saves."""
    return get_rank() == 0


def distributed_device() -> torch.device:
    """This process's device: ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def ddp_device_ids(device: str | torch.device) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` on CUDA, ``None`` on CPU."""
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else None


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialise the default process group from torchrun's environment, once.

    The backend follows the device (:func:`distributed_backend`); on CUDA the current device is set to
    ``cuda:$LOCAL_RANK``. Ranks other than 0 log Ignite's engine messages at WARNING only. Without torchrun's
    variables (``WORLD_SIZE`` unset) nothing is initialised.

    Args:
        device: default :func:`distributed_device`.
        timeout_s: collective timeout in seconds, default 1800.

    Returns:
        The device of this rank.
    """
    device = torch.device(device) if device is not None else distributed_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend=distributed_backend(device), timeout=timedelta(seconds=timeout_s))
        logger.info(
            "process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), dist.get_backend()
        )
        if dist.get_rank() != 0:
            logging.getLogger("ignite").setLevel(logging.WARNING)
        # Ignite sets up its own view of the group (a collective ``new_group``) the first time it asks for the
        # rank, e.g. inside a checkpoint handler; handlers are built on some ranks only, so do it here, on all ranks.
        import ignite.distributed as idist

        idist.get_rank()
    return device


def shutdown_distributed() -> None:
    """End a distributed run: wait for every rank, then destroy the process groups (the default one and Ignite's).

    The barrier keeps a rank from tearing its Gloo connections down while another rank still works (rank 0 writes
    the last checkpoints after the final collective); without it a rank occasionally aborted at exit ("terminate
    called without an active exception") after a complete run. A no-op without a process group.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items``: every ``world_size``-th item from its rank on (each item goes to exactly one
    rank, and ranks get near-equal counts of a sorted list); all of them in a single process."""
    return list(items)[get_rank() :: get_world_size()]


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (the network itself otherwise)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def wait_for_file(path: str | os.PathLike, timeout_s: float = 3600.0, poll_s: float = 1.0) -> None:
    """Wait until another rank (rank 0) has written ``path``.

    A file wait, not a collective: config items are built lazily, in an order that may differ between ranks, so a
    barrier here could pair with another rank's DDP broadcast.

    Raises:
        TimeoutError: the file did not appear within ``timeout_s`` seconds.
    """
    path = Path(path)
    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank {get_rank()}: {str(path)!r} did not appear within {timeout_s:.0f} s.")
        time.sleep(poll_s)

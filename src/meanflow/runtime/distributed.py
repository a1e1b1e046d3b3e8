"""Processes launched by ``torchrun``: rank, world size and the process group.

``torchrun --nproc_per_node=N -m meanflow train ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init` reads them and
joins PyTorch's process group (NCCL on CUDA, gloo on CPU). Without those variables everything
runs as one process (rank 0 of 1) and no process group is created. Multi-node runs use
torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``; docs/distributed.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MeanFlowError, check


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, grids and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.world_size > 1


def from_env() -> Dist:
    """The rank, world size and local rank torchrun set (rank 0 of 1 without torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MeanFlowError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun"
        ) from None
    check(
        world >= 1 and 0 <= rank < world,
        f"RANK {rank} is not in 0..{world - 1} (WORLD_SIZE {world}); launch with torchrun",
    )
    return Dist(rank, world, local)


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun prepared (if any) and pick this rank's device.

    On CUDA each process takes ``cuda:LOCAL_RANK`` and the NCCL backend; on CPU, gloo. Returns
    ``(Dist, device)``. A second call in the same process reuses the existing group."""
    info = from_env()
    if not info.active:
        return info, device
    if device.type == "cuda":
        check(
            info.local_rank < torch.cuda.device_count(),
            f"LOCAL_RANK {info.local_rank} has "
            f"no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node",
        )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        # torchrun keeps one key-value store across restarts; without a prefix per attempt,
        # restarted workers can read their dead peers' addresses and fail to connect
        store, _, _ = next(dist.rendezvous("env://", info.rank, info.world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        extra: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"meanflow/{attempt}", store),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            **extra,
        )
    return info, device


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

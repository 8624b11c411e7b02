"""Distributed helpers of the built-in trainer: join the torchrun process group (gloo on CPU, nccl on GPU),
sum a tensor over ranks, barrier; all no-ops for a single process."""

from __future__ import annotations

import os

import torch


def _dist_setup(device: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun / torch elastic; (rank, world, local_rank)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, local


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()

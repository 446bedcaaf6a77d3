"""torchrun/DDP: the process group and the collectives the loop needs (no-ops in one process)."""

from __future__ import annotations

import datetime as _dt
import os

import torch
import torch.distributed as dist
from torch import nn

from mrhscale.errors import MRHError


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise MRHError("RANK/WORLD_SIZE/LOCAL_RANK in the environment are not integers") from None
    return rank, max(world, 1), local


def init_distributed(world: int, local_rank: int, timeout_s: float) -> bool:
    """Join the process group if launched with WORLD_SIZE > 1; returns whether this call did."""
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(seconds=timeout_s))
    return True


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist_on():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier():
    if dist_on():
        dist.barrier()


def replica_max_abs_diff(model: nn.Module) -> float:
    """Largest parameter difference between any rank and rank 0 (0.0 when in sync)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    if not dist_on():
        return 0.0
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return float(max((q - parts[0]).abs().max() for q in parts))

"""Data-parallel training across processes started by torchrun (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

`torchrun --nproc-per-node N -m ctprune MODEL ...` runs N copies; `init_from_env` joins them (NCCL on GPUs, gloo on
CPU), `fine_tune` wraps the student in DistributedDataParallel and shards every epoch with a DistributedSampler, and
only the main process (rank 0) writes checkpoints and outputs. Gradients are all-reduced before the hooks see them,
so importance and masks computed from them agree on every rank; `broadcast_tensors` is there for state that is not.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "is_distributed", "init_from_env", "world_size", "rank", "local_rank",
           "is_main_process", "wrap_ddp", "broadcast_tensors", "all_reduce_sum", "barrier", "cleanup"]

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """The world size torchrun announced (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun set up; True when this is a multi-process run."""
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    log.info("process %d of %d joined (%s)", rank(), world_size(), backend)
    return True


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a single-process run): the one process that writes files and prints."""
    return rank() == 0


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Start every rank from rank 0's weights (DDP broadcasts them on construction).
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite `tensors` in place on every rank with rank `src`'s values (no-op in a single process)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src)


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum numbers across ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()

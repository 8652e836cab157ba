"""torch.distributed set-up for `torchrun` (one process per GPU; gloo on CPU) and small collectives.

Everything here degrades to a no-op in a single plain process, so the same training loop runs
from `python tools/train_net.py` and from `torchrun --nproc_per_node=N tools/train_net.py`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from detector.config import ConfigError


def init_distributed(device: str) -> torch.device:
    """Join the process group described by torchrun's environment variables; return this rank's device.

    `device` is the config's MODEL.DEVICE ("cpu" or "cuda"). NCCL is used for CUDA, gloo for CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda or "not built in"
            raise ConfigError(f"'MODEL.DEVICE' is {device!r} but this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA {built}); to run on the CPU add MODEL.DEVICE cpu "
                              "to the command")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for small things such as RNG states or predictions)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_gather_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows of `t` `[n_r, ...]` (counts may differ) concatenated in rank order, and where this
    rank's rows start. This rank's rows are `t` itself, so gradient flows through them; the others' are
    copies without gradient (their own process back-propagates them). Every rank must call it."""
    if not is_distributed():
        return t, 0
    rank, world = get_rank(), get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [t if r == rank else part[:n] for r, (part, n) in enumerate(zip(parts, sizes))]
    return torch.cat(rows), sum(sizes[:rank])

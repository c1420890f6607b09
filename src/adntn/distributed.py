"""Running under ``torchrun``: one process per device, DistributedDataParallel for fine-tuning.

``torchrun --nproc-per-node N -m adntn compress ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup` joins them into one process group (gloo on
the CPU, nccl with ``--device cuda``, each process on ``cuda:LOCAL_RANK``). Outside torchrun
every function here is a no-op for one process of rank 0.

What runs where: the weight-space and activation-space fits run on every rank identically (same
seed, same inputs); the trunk features are computed in shards (each rank its share of the
batches, into one shared file); fine-tuning splits each global batch of ``batch_size`` samples
across the ranks (each rank ``batch_size / world_size``) and averages the gradients, so the
result is a one-process run's up to the order of floating-point reductions; held-out accuracy is
counted in shards and summed. Rank 0 alone writes the output.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def requested() -> bool:
    """Whether torchrun (or any launcher setting RANK/WORLD_SIZE) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: str) -> str:
    """Join the process group when launched by torchrun; returns the device this rank uses.

    ``cuda`` becomes ``cuda:LOCAL_RANK``; ``cpu`` stays.
    """
    if not requested():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not active():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def max_all(value: float) -> float:
    """The largest ``value`` of all ranks."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(count: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's (or ``part``'s) contiguous share of ``count`` items."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return count * part // parts, count * (part + 1) // parts

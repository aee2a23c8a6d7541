"""The one place that talks to ``torch.distributed``.

Every collective in gradtail goes through these helpers. Each does nothing (returns its input) when no
process group is initialized, so single-process code never needs a special case
(docs/methods/eql.md §1 rule 3).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialized (torchrun / DDP, or a test's gloo group)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK), 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_environment() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) initialise the default process group once: NCCL with one
    GPU per local rank when CUDA is available, gloo on CPU. Returns whether the run is distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """SUM-all-reduce ``tensor`` in place across ranks; a no-op without a process group.

    Every rank must call this at the same point of every step (a collective), or the job hangs.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients_(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over ranks in one collective (parameters outside the DDP model,
    e.g. a regularizer's projection heads). A parameter without a gradient contributes zeros, so every
    rank reaches the collective with the same tensor; a no-op without a process group."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``tensor`` in place from rank ``src``; a no-op without a process group."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(n: int) -> range:
    """This process's part of ``n`` evaluation items: every ``world``-th from its rank (disjoint, together
    exactly ``range(n)``; an uneven last round leaves the higher ranks one item short)."""
    return range(rank(), n, world_size())


def gather_strided(tensor: torch.Tensor) -> torch.Tensor:
    """The whole evaluation set from each rank's :func:`shard` of it: ``tensor`` (k_r, ...) on rank r
    holds items r, r + W, r + 2W, ...; returns (sum k_r, ...) in item order on every rank. Identity
    without a process group. Sizes may differ by one between ranks (padded for the collective)."""
    if not is_distributed():
        return tensor
    w = world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(w)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    most = max(counts)
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    for r, (part, k) in enumerate(zip(parts, counts, strict=True)):
        out[r::w] = part[:k]
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable plain data: lists of result records), in rank order; ``[obj]``
    without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (plain data); ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]

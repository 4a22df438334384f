"""Minimal multi-process support for runs started with ``torchrun``.

Call `init_from_env` once per process; `fit` and `evaluate` then notice the process group by themselves:
`fit` wraps the model in DistributedDataParallel and gives each rank a `DistributedSampler` share of the
data, only rank 0 writes checkpoints and shows progress, and `evaluate` sums its counts over all ranks.
The compression loop builds on the helpers below: `on_main` (rank 0 reads or writes, every rank gets its
answer or its error), `broadcast_object`, `broadcast_state` and `gather_map` (a list of independent jobs split
over the ranks). Without a process group (or with a single process) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from tlc.errors import TLCError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run, and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_from_env(device: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's RANK, WORLD_SIZE and LOCAL_RANK variables.

    Uses NCCL and the GPU numbered LOCAL_RANK when CUDA is available (or ``device`` names cuda), gloo on
    the CPU otherwise (or when ``device`` is "cpu"). Without these variables (a plain ``python`` run) it
    returns a single-process environment and joins nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, device)


def world_size() -> int:
    """Number of processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files and shows progress (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel when several ranks train, the model itself otherwise.

    Parameters unused in a forward pass (e.g. behind a linearized branch) are tolerated.
    """
    if world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def train_sampler(dataset: Dataset, seed: int, epoch: int) -> DistributedSampler | None:
    """This rank's shuffled share of `dataset` for `epoch` (None in a single-process run)."""
    if world_size() == 1:
        return None
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


def shard(dataset: Dataset) -> Dataset:
    """Every world_size-th example starting at this rank: disjoint shares that cover `dataset` exactly
    (unlike `DistributedSampler`, which pads), so that summed counts are exact."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (picklable; the other ranks' `obj` is ignored)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run by rank 0 alone (reading or writing rank 0's files), its result given to
    every rank. An error it raises is raised on every rank, so no rank is left waiting in a collective;
    ranks other than 0 mark it ``shared`` (it is rank 0's to report)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    if is_main_process():
        try:
            outcome = (True, fn(*args, **kwargs))
        except (TLCError, OSError, ValueError, KeyError) as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if ok:
        return value
    if not is_main_process():
        value.shared = True
    raise value


def broadcast_state(module: nn.Module) -> nn.Module:
    """Give every rank rank 0's parameters and buffers (in place): the replicas end identical, batch-norm
    running statistics included (DistributedDataParallel keeps the parameters equal, not the buffers)."""
    if world_size() == 1:
        return module
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
            if data.is_contiguous():
                dist.broadcast(data, src=0)
            else:
                copy = data.contiguous()
                dist.broadcast(copy, src=0)
                data.copy_(copy)
    return module


def gather_map(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` with the work split over the ranks: rank r computes ``fn`` of items r, r + N, ...
    (``fn`` maps a list to a list of as many results, each depending on its item alone) and every rank
    gets all the results, in the order of `items`."""
    items = list(items)
    world = world_size()
    if world == 1:
        return list(fn(items))
    mine = list(fn(items[rank()::world]))
    shares: list[list[R]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, mine)
    results: list[Any] = [None] * len(items)
    for r, share in enumerate(shares):
        results[r::world] = share
    return results

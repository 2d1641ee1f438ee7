"""Data parallel training across processes (torchrun), with torch.distributed (ComfyUI-agnostic).

Each rank holds the whole model and the same LoRA, takes its share of every global batch and trains on it;
the gradients are averaged across the ranks before each update, so every rank makes the same update, and a
run on N ranks follows the same schedule as one process at the same global batch (Train LoRA's
batch_size). To match the one-process run sample for sample, every rank makes the same random draws for
the whole global batch (data order, crops, flips, captions, noise, sigmas) and keeps its slice: rank r
trains samples [r * B/N, (r + 1) * B/N). Only rank 0 writes files (the headless runner gives the other
ranks a throwaway folder: the same code runs on every rank).

One process, or torch.distributed not initialised: `current()` is the single shard and nothing here does
any communication.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable

import torch

# How long a rank waits in a collective before it gives up (a rank that died mid-step is usually detected
# at once, from its closed connection; this bounds a rank that hangs)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Rank 0 writes the files; every other rank's writes go to a throwaway folder."""
        return self.rank == 0

    def part(self, batch: int) -> slice:
        """This rank's samples of a global batch of `batch` (a multiple of world)."""
        share = batch // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Every parameter's gradient replaced by its mean over the ranks (one flat all-reduce)."""
        if not self.parallel:
            return
        gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if not gradients:
            return
        flat = torch.cat([gradient.reshape(-1).float() for gradient in gradients])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for gradient in gradients:
            count = gradient.numel()
            gradient.copy_(flat[offset:offset + count].view_as(gradient))
            offset += count

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-rank scalar's mean over the ranks (the step's loss over the global batch)."""
        if not self.parallel:
            return value
        total = value.detach().float().clone()
        torch.distributed.all_reduce(total)
        return total / self.world

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when it is True on any (Cancel: the ranks stop at the same step)."""
        if not self.parallel:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)


def current() -> Shard:
    """The running process's shard (the single shard outside a torch.distributed group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Shard(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Shard()


def join_from_environment(device_type: str) -> Shard:
    """Join the group torchrun (or accelerate launch) describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, ...): NCCL between CUDA devices, gloo otherwise. One process: the single shard."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                             timeout=COLLECTIVE_TIMEOUT)
    return current()


def leave() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_group_failure(error: BaseException) -> bool:
    """An error from a collective whose peer is gone (a rank died or was killed)."""
    failure_types = tuple(kind for kind in (getattr(torch.distributed, "DistBackendError", None),
                                            getattr(torch.distributed, "DistNetworkError", None)) if kind is not None)
    if failure_types and isinstance(error, failure_types):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroup", "gloo", "NCCL"))

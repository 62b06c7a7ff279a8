"""Data-parallel training over several processes (``accelerate launch``, ``torchrun``): the run's ``Shard``.

Every process builds the same plan and draws the same noise and timesteps for the whole global batch
from the same seeded generator; each keeps only its own contiguous rows (``rows``). Each process
weights its local mean loss by its share of the global batch, and the gradients are summed over
processes before clipping, so the update equals the one a single process computes on the whole
global batch (up to float summation order). Only the main process writes files and prints.

With one process (``Shard()``) every operation is the identity: the single-process loop is unchanged.
Launchers announce themselves through ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``;
``shard_from_environment`` joins the process group (nccl on CUDA, gloo on the CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world_size`` (1 = a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n``: contiguous, deterministic, sizes differ by at most 1."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def share(self, n: int) -> float:
        """This process's fraction of a global batch of ``n`` (weights its local mean loss)."""
        rows = self.rows(n)
        return (rows.stop - rows.start) / n

    def sum(self, value: float, device: torch.device) -> float:
        """The sum of ``value`` over processes (every process gets the same number)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        torch.distributed.all_reduce(tensor)
        return float(tensor)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when any process says so (interrupts must stop all processes at one step)."""
        return bool(self.sum(1.0 if flag else 0.0, device) > 0) if self.distributed else flag

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum share-weighted gradients over processes, in one flat buffer (LoRA weights are small)."""
        if not self.distributed:
            return
        grads = []
        for p in params:
            if p.grad is None:  # a process whose share of a batch was empty still joins the reduction
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def device(self) -> torch.device:
        """The device of this process: its own GPU (``LOCAL_RANK``), or the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
        return torch.device("cpu")


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher started this process as one of several."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1) > 1


def shard_from_environment(environ: Mapping[str, str] | None = None) -> Shard:
    """Read the launcher's variables and join the process group; a plain ``Shard()`` when not launched."""
    env = os.environ if environ is None else environ
    if not launched(env):
        return Shard()
    try:
        shard = Shard(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except (KeyError, ValueError):
        raise InputError("WORLD_SIZE is set but RANK is missing or not a number; start several processes with "
                         "`accelerate launch` or `torchrun`, which set RANK, LOCAL_RANK and MASTER_ADDR") from None
    if "MASTER_ADDR" not in env:
        raise InputError("WORLD_SIZE is set but MASTER_ADDR is not; start several processes with `accelerate launch` "
                         "or `torchrun`, which set it")
    if not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(shard.local_rank)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=shard.rank,
                                             world_size=shard.world_size)
    return shard


def close(shard: Shard) -> None:
    """Leave the process group (a no-op for a single process)."""
    if shard.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

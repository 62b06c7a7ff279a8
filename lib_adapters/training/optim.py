"""Optimizers (AdamW, 8-bit AdamW from bitsandbytes) and learning-rate schedules with linear warmup."""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from .config import LRSchedule, OptimizerKind, TrainConfig


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerKind.ADAMW_8BIT:
        try:
            import bitsandbytes as bnb  # optional dependency
        except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
            raise InputError("8-bit AdamW needs the bitsandbytes package and a CUDA GPU (pip install bitsandbytes); "
                             f"it could not be loaded ({type(exc).__name__}: {exc}). Choose adamw instead.") from exc
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    # foreach=None: torch picks (the multi-tensor kernels on CUDA, the per-tensor loop on the CPU, where
    # foreach would allocate temporaries the size of every trainable tensor: +3.5 % peak memory for an
    # IP-Adapter plus, bench/train_adapters_step.py), as the reference training loops get it.
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=None)


def lr_factor(schedule: LRSchedule, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup`` steps (never 0: the first step uses 1/warmup); then
    constant stays at 1, linear falls to 0 at ``total``, cosine follows half a cosine to 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule is LRSchedule.LINEAR:
        return 1.0 - progress
    if schedule is LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    schedule, warmup, total = config.lr_schedule, config.warmup_steps, config.steps

    def factor(step: int) -> float:
        return lr_factor(schedule, step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

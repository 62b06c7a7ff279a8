"""Gradient checkpointing by wrapping UNet block forwards, reversibly (works for ldm, sgm and diffusers).

The WebUI's own ``sd_hijack_checkpoint`` patches ldm classes only (not sgm, so not SDXL) and for
every instance at once; wrapping the instances we train keeps it local and undoable. Non-reentrant
``torch.utils.checkpoint`` gives gradients to parameters (LoRA) even when the block's inputs do not
require grad, and replays forward hooks during recomputation.

A dict argument is passed as a copy taken at call time: Forge hands every layer the one
``transformer_options`` dict of the UNet call and keeps writing into it (``block``, ``block_index``),
and its patches (ours included) find their site from those keys. The recomputation in backward runs
after the whole forward, so it must see the values of its own call, not the last ones.

``context`` (optional) is ``torch.utils.checkpoint``'s ``context_fn``: the backend's context managers for the
forward and for its recomputation in backward (Forge's backend uses it so its UNet's in-place residuals are
computed out of place in the recomputation too, ``augmented.py``).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from ...unet.hooks import Forward, PatchSet


def _checkpointed(context: Callable | None) -> Callable[[Forward], Forward]:
    options = {"context_fn": context} if context is not None else {}

    def wrap(forward: Forward) -> Forward:
        def run(*args: Any, **kwargs: Any) -> Any:
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)
        return run
    return wrap


def enable_block_checkpointing(blocks: list[nn.Module], context: Callable | None = None) -> PatchSet:
    """Wrap every block; call ``restore()`` on the result to undo."""
    patches = PatchSet()
    wrap = _checkpointed(context)
    for block in blocks:
        patches.wrap(block, wrap)
    return patches

"""Gradient checkpointing by wrapping UNet block forwards, reversibly (works for ldm, sgm and diffusers).

The WebUI's own ``sd_hijack_checkpoint`` patches ldm classes only (not sgm, so not SDXL) and for
every instance at once; wrapping the instances we train keeps it local and undoable. Non-reentrant
``torch.utils.checkpoint`` gives gradients to parameters (LoRA) even when the block's inputs do not
require grad, and replays forward hooks during recomputation.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from ...unet.hooks import Forward, PatchSet


def _checkpointed(forward: Forward) -> Forward:
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def enable_block_checkpointing(blocks: list[nn.Module]) -> PatchSet:
    """Wrap every block; call ``restore()`` on the result to undo."""
    patches = PatchSet()
    for block in blocks:
        patches.wrap(block, _checkpointed)
    return patches

"""The named points where adapters act on a UNet, and the interface a host binding drives.

A host binding finds these points in its host's UNet (``a1111.py``: instance forward wrappers on
an ldm/sgm UNet; on Forge it would be the UnetPatcher's block modifiers and attn2 patches) and at
each asks a ``UNetPoints`` (the generation's session) what to add:

- ``RESIDUAL``: right after the T2I site of level ``i`` (``layout.t2i_sites[i]``) runs, before
  the UNet keeps ``h`` as a skip connection: ``h + residual(i, h, call)``.
- ``CONTEXT``: the text context every attn2 reads becomes ``context(context, call)`` (tokens
  appended to it, before the attention runs; so any attention implementation sees them).
- ``ATTENTION``: every attn2 ``site`` whose ``attends(site)`` is true returns its output plus
  ``attention(site, attn, x, query, call)`` (``x``: attn2's input; ``query``: ``attn.to_q(x)``
  if the binding caught it, else None and it is computed).
- ``WEIGHTS``: for the whole generation the UNet's parameter at each path of ``weight_deltas()``
  holds its value plus the delta; the binding puts the original back afterwards.

``UNetCall`` is what the binding knows about the UNet call in progress: the latent's size and
which of its rows are cond rows (on the A1111 WebUI from ``take_rows``, which counts them off the
CFG denoiser's announcement; a host that marks the rows per call passes them itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from .layout import BoundLayout, IPSite


class Point(str, Enum):
    RESIDUAL = "residual after a T2I site"
    CONTEXT = "tokens appended to the attn2 context"
    ATTENTION = "attention added to the attn2 output"
    WEIGHTS = "deltas on UNet weights for the generation"


@dataclass(frozen=True)
class UNetCall:
    latent_hw: tuple[int, int] | None  # the latent's (height, width) in this call; None: not known
    cond_mask: torch.Tensor | None  # [rows] 1.0 for cond rows, 0.0 for uncond; None: unknown (all treated as cond)


class UNetPoints(Protocol):
    """What a host binding calls. ``GenerationSession`` implements it."""

    @property
    def bound(self) -> BoundLayout: ...

    def uses(self, point: Point) -> bool:
        """Whether any unit acts at ``point`` in this generation (a binding wires only those)."""

    def take_rows(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """The cond mask of a UNet call of ``rows`` rows, counted off the denoiser's announcement."""

    def residual(self, level: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor | None:
        """What to add to ``h`` after the T2I site of ``level`` (None: nothing)."""

    def context(self, context: torch.Tensor, call: UNetCall | None) -> torch.Tensor:
        """The attn2 text context with the units' tokens appended (``context`` itself when none act)."""

    def attends(self, site: IPSite) -> bool:
        """Whether anything will be added to this attn2's output now (else the binding just runs it)."""

    def attention(self, site: IPSite, attn: nn.Module, x: torch.Tensor, query: torch.Tensor | None,
                  call: UNetCall | None) -> torch.Tensor | None:
        """What to add to the output of ``attn`` (the attn2 at ``site``) for input ``x``, after ``to_out``."""

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """Parameter path in the UNet -> the delta its value gets for the generation."""

"""The runtime protocol: what one unit contributes to one generation, whatever the host.

A family's builder (``build.Family``) turns a unit into a runtime once per generation: it loads the
file, checks it against the UNet, encodes or preprocesses the unit's images. From then on the runtime
only answers the session at the UNet's named points (``unet/points.py``) that it declares in
``points``, and only while the sampling progress is inside its window (``start``..``end``, fractions
of the steps; ``weight`` is its strength, applied by the runtime itself):

- ``Point.RESIDUAL``: ``residual(level, h, call)``, added to ``h`` after the T2I site of ``level``
  (T2I-Adapters: features fitted to ``h``).
- ``Point.CONTEXT``: ``context_tokens(rows, call, like)``, tokens [rows, T, context] appended to the
  text context of every attn2 (the style T2I-Adapter).
- ``Point.ATTENTION``: ``attends(site)``, then ``attention(site, attn, q, call)``: a term
  [rows, tokens, dim] added to the output of the attn2 at ``site`` (after ``to_out``, without its
  bias), given the query split in heads, [rows, heads, tokens, head_dim] (IP-Adapters).
- ``Point.WEIGHTS``: ``weight_deltas(bound)``, parameter path -> delta (a tensor, or a factored
  ``LowRankDelta``) the UNet's weights get for the whole generation, whatever the window (the LoRA that
  goes with a FaceID model); how a host applies it is its binding's business (``unet/points.py``).

``UNetCall`` (``call``) tells the latent size and which rows are cond rows. ``release()`` is called
when the generation ends (drop per-generation caches, move models back to system memory).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..unet.layout import BoundLayout, IPSite
from ..unet.points import Point, UNetCall, WeightDelta
from .schedule import in_window


class UnitRuntime:
    """Base of every runtime: no contribution anywhere until a subclass declares ``points`` and answers them."""

    label: str  # "Adapter 1": messages name the unit
    weight: float
    start: float  # the window, fractions of the sampling steps
    end: float
    points: ClassVar[frozenset[Point]] = frozenset()

    def active(self, progress: float | None) -> bool:
        return in_window(progress, self.start, self.end)

    def residual(self, level: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor | None:
        return None

    def context_tokens(self, rows: int, call: UNetCall | None, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def attends(self, site: IPSite) -> bool:
        return False

    def attention(self, site: IPSite, attn: nn.Module, q: torch.Tensor, call: UNetCall | None) -> torch.Tensor | None:
        return None

    def weight_deltas(self, bound: BoundLayout) -> dict[str, WeightDelta]:
        return {}

    def release(self) -> None:
        pass

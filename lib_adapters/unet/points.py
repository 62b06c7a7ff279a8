"""The named points where adapters act on a UNet, and the interface a host binding drives.

A host binding finds these points in its host's UNet (``a1111.py``: instance forward wrappers on
an ldm/sgm UNet; ``forge.py``: block modifiers, attn2 patches and weight patches on a clone of Forge's
UnetPatcher) and at
each asks a ``UNetPoints`` (the generation's session) what to add:

- ``RESIDUAL``: right after the T2I site of level ``i`` (``layout.t2i_sites[i]``) runs, before
  the UNet keeps ``h`` as a skip connection: ``h + residual(i, h, call)``.
- ``CONTEXT``: the text context every attn2 reads becomes ``context(context, call)`` (tokens
  appended to it, before the attention runs; so any attention implementation sees them).
- ``ATTENTION``: every attn2 ``site`` whose ``attends(site)`` is true returns its output plus
  ``attention(site, attn, x, query, call)`` (``x``: attn2's input; ``query``: ``attn.to_q(x)``
  if the binding caught it, else None and it is computed).
- ``WEIGHTS``: for the whole generation the UNet's parameter at each path of ``weight_deltas()``
  computes as its value plus the delta (a tensor, or a ``LowRankDelta`` kept factored: a LoRA); the
  binding puts everything back afterwards. How is the binding's choice: on A1111 the delta is added
  to the layer's output (the weights are never written, see ``a1111.py``), and the layer carries the
  delta under ``FORWARD_DELTA`` meanwhile, so ``current_weight`` tells what it computes with; on Forge
  the host's patcher merges the deltas into the weights while the patched clone is loaded (a
  ``LowRankDelta`` handed over factored, as Forge's own LoRA patches are), so the parameter itself is
  what it computes with.

``UNetCall`` is what the binding knows about the UNet call in progress: the latent's size and
which of its rows are cond rows (on the A1111 WebUI from ``take_rows``, which counts them off the
CFG denoiser's announcement; a host that marks the rows per call passes them itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, Union

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class LowRankDelta:
    """The weight delta ``scale * up @ down`` of a Linear layer, kept factored (rank r, far below the layer's
    width): a LoRA. Factored it costs r * (in + out) values instead of in * out (SDXL's attention layers in
    fp32: a few hundred MB instead of 2.8 GB), and applying it to an input two thin matmuls."""

    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in]
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    def dense(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())

    def to(self, device: torch.device, dtype: torch.dtype) -> "LowRankDelta":
        return LowRankDelta(self.up.to(device, dtype), self.down.to(device, dtype), self.scale)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """What the delta adds to the layer's output for input ``x``: ``scale * x @ down^T @ up^T``."""
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def __add__(self, other: "LowRankDelta") -> "LowRankDelta":
        """Two LoRAs on one layer: their factors side by side (rank r1 + r2), exactly the sum."""
        return LowRankDelta(torch.cat([self.up.float() * self.scale, other.up.float() * other.scale], dim=1),
                            torch.cat([self.down.float(), other.down.float()]), 1.0)


WeightDelta = Union[torch.Tensor, LowRankDelta]
FORWARD_DELTA = "adapters_forward_delta"  # a layer whose delta a binding adds to its output carries it here


def dense(delta: WeightDelta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, LowRankDelta) else delta


def add_deltas(a: WeightDelta, b: WeightDelta) -> WeightDelta:
    if isinstance(a, LowRankDelta) and isinstance(b, LowRankDelta):
        return a + b
    return dense(a) + dense(b)


def linear_weight(layer: nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of a layer that computes ``x @ weight.T + bias``, or None for any other layer. Duck-typed:
    Forge main builds its UNet's linear layers as plain ``nn.Module``s with ``weight`` and ``bias`` (its
    ``ForgeOperations.Linear``, to skip weight initialisation), not as ``nn.Linear``."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) or (isinstance(weight, torch.Tensor) and weight.ndim == 2
                                        and hasattr(layer, "in_features") and hasattr(layer, "out_features")):
        return weight
    return None


def current_weight(layer: nn.Module) -> torch.Tensor:
    """The weight ``layer`` computes with now: its parameter, plus the delta a binding adds to its output rather
    than to the parameter (``FORWARD_DELTA``). Whoever folds the layer's weight into something else (the IP
    branch folds ``to_out`` into its values) reads it here."""
    weight = layer.weight
    delta = layer.__dict__.get(FORWARD_DELTA)
    return weight if delta is None else weight + dense(delta).to(weight.device, weight.dtype)


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

    def weight_deltas(self) -> dict[str, WeightDelta]:
        """Parameter path in the UNet -> the delta its value gets for the generation."""

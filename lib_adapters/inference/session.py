"""One generation's contributions at the UNet's named points, whatever the host: the ``UNetPoints`` a binding drives.

The session holds the generation's runtimes (``runtime.UnitRuntime``, one per unit, in unit order)
and what they share: the sampling progress, which opens and closes their windows, and the cond/uncond
row layout. At each point it asks the runtimes that act there and are in their window, and combines
their answers: residuals and attention terms are summed, context tokens appended, weight deltas
summed per parameter, always in unit order. Caches stay in the runtimes (T2I features per latent
size, IP keys and values per site). It installs nothing: a host binding (``unet/a1111.py``) wires
it into a UNet.

Which rows are cond and which uncond is never guessed from batch order. The A1111 WebUI's CFG
denoiser reports, before each step, how many cond and uncond rows it stacked (``on_denoiser``); the
UNet calls of that step then consume those rows in order (``take_rows``), whether the denoiser
batches them in one call, splits them into chunks, or skips the uncond rows. A host that marks the
rows of each call itself puts them in the ``UNetCall`` and reports only the progress (``on_progress``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..unet.layout import BoundLayout, IPSite
from ..unet.points import Point, UNetCall, WeightDelta, add_deltas
from .runtime import UnitRuntime

log = logging.getLogger(__name__)


@dataclass
class GenerationSession:
    bound: BoundLayout
    runtimes: Sequence[UnitRuntime] = ()
    _at: dict[Point, list[UnitRuntime]] = field(default_factory=dict)
    _row_roles: list[bool] | None = None  # True = cond row, for the current denoiser step
    _row_cursor: int = 0
    _progress: float | None = None
    _warned_rows: bool = False

    def __post_init__(self) -> None:
        self._at = {point: [r for r in self.runtimes if point in r.points] for point in Point}

    def uses(self, point: Point) -> bool:
        return bool(self._at[point])

    def _active(self, point: Point) -> list[UnitRuntime]:
        return [r for r in self._at[point] if r.active(self._progress)]

    def close(self) -> None:
        """The generation is over: every runtime drops its caches and moves its models back."""
        for runtime in self.runtimes:
            runtime.release()

    # what the sampler tells us -------------------------------------------------------------
    def on_progress(self, step: int | None, total_steps: int | None) -> None:
        self._progress = None if step is None or not total_steps else step / total_steps

    def on_denoiser(self, cond_rows: int, uncond_rows: int, step: int | None, total_steps: int | None) -> None:
        """Called before each denoiser step with the rows it stacked: all cond rows, then uncond rows."""
        self._row_roles = [True] * cond_rows + [False] * uncond_rows
        self._row_cursor = 0
        self.on_progress(step, total_steps)

    def take_rows(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        roles = self._row_roles
        if roles is None:
            return None  # outside the WebUI's denoiser (headless use): every row is treated alike
        chunk = roles[self._row_cursor:self._row_cursor + rows]
        self._row_cursor += rows
        if len(chunk) != rows:
            if not self._warned_rows:
                log.warning("UNet called with %d rows the denoiser did not announce; treating all as cond", rows)
                self._warned_rows = True
            return None
        return torch.tensor(chunk, dtype=like.dtype, device=like.device)

    # the points ------------------------------------------------------------------------------
    def residual(self, level: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor | None:
        return _sum(r.residual(level, h, call) for r in self._active(Point.RESIDUAL))

    def context(self, context: torch.Tensor, call: UNetCall | None) -> torch.Tensor:
        extra = [t for r in self._active(Point.CONTEXT) for t in [r.context_tokens(context.shape[0], call, context)]
                 if t is not None]
        return torch.cat([context, *extra], dim=1) if extra else context

    def attends(self, site: IPSite) -> bool:
        return any(r.attends(site) for r in self._active(Point.ATTENTION))

    def attention(self, site: IPSite, attn: nn.Module, x: torch.Tensor, query: torch.Tensor | None,
                  call: UNetCall | None) -> torch.Tensor | None:
        """The runtimes' terms for one attn2 call; ``query``: ``to_q(x)`` as the text attention computed it, if
        caught (else computed here once for all runtimes)."""
        runtimes = [r for r in self._active(Point.ATTENTION) if r.attends(site)]
        if not runtimes:
            return None
        heads = int(attn.heads)
        q = query if query is not None and query.shape[:2] == x.shape[:2] else attn.to_q(x)
        b, n, inner = q.shape
        q = q.view(b, n, heads, inner // heads).transpose(1, 2)
        return _sum(r.attention(site, attn, q, call) for r in runtimes)

    def weight_deltas(self) -> dict[str, WeightDelta]:
        deltas: dict[str, WeightDelta] = {}
        for runtime in self._at[Point.WEIGHTS]:
            for path, delta in runtime.weight_deltas(self.bound).items():
                deltas[path] = delta if path not in deltas else add_deltas(deltas[path], delta)
        return deltas


def _sum(terms) -> torch.Tensor | None:
    total: torch.Tensor | None = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total

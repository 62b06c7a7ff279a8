"""One generation's lifetime: install wrappers, follow sampling, add residuals, restore exactly.

The session wraps the UNet's entry module (its output tells the latent size and the number of
rows of each UNet call) and every T2I site. Which rows are cond and which uncond is never guessed
from batch order: the WebUI's CFG denoiser reports, before each step, how many cond and uncond
rows it stacked (``on_denoiser``); the UNet calls of that step then consume those rows in order,
whether the denoiser batches them in one call, splits them into chunks, or skips the uncond rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..unet.hooks import Forward, PatchSet
from ..unet.layout import BoundLayout, IPSite, bind_layout
from .ip import IPUnitRuntime, capture_query, image_attention
from .schedule import in_window
from .t2i import StyleUnitRuntime, T2IUnitRuntime, fit_feature

log = logging.getLogger(__name__)


@dataclass
class _CallState:
    latent_hw: tuple[int, int]
    cond_mask: torch.Tensor | None  # [rows] 1.0 for cond rows, 0.0 for uncond; None when unknown


@dataclass
class GenerationSession:
    """Owns the hooks of one generation; use as a context manager or call install/restore."""

    unet: nn.Module
    t2i_units: Sequence[T2IUnitRuntime] = ()
    bound: BoundLayout | None = None
    ip_units: Sequence[IPUnitRuntime] = ()
    style_units: Sequence[StyleUnitRuntime] = ()
    _patches: PatchSet = field(default_factory=PatchSet)
    _row_roles: list[bool] | None = None  # True = cond row, for the current denoiser step
    _row_cursor: int = 0
    _progress: float | None = None
    _call: _CallState | None = None
    _warned_rows: bool = False

    def __post_init__(self) -> None:
        if self.bound is None:
            self.bound = bind_layout(self.unet)
        for unit in self.t2i_units:
            unit.check_compatible(self.bound)
        for ip_unit in self.ip_units:
            ip_unit.adapter.check_compatible(self.bound, ip_unit.label)

    # lifecycle -----------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return len(self._patches) > 0

    def install(self) -> None:
        if self.installed or not (self.t2i_units or self.ip_units or self.style_units):
            return
        bound = self.bound
        assert bound is not None
        self._patches.wrap(bound.module(bound.layout.entry), self._wrap_entry)
        if self.t2i_units:
            for level, site in enumerate(bound.layout.t2i_sites):
                self._patches.wrap(bound.module(site.path), self._make_site_wrapper(level))
        if self.ip_units or self.style_units:
            for ip_site in bound.ip_sites():
                module = bound.module(ip_site.path)
                self._patches.wrap(module, self._make_attn2_wrapper(ip_site, module))

    def restore(self) -> None:
        self._patches.restore()
        self._call = None
        for unit in self.t2i_units:
            unit.adapter.module.to("cpu")
        for ip_unit in self.ip_units:
            ip_unit.release()

    def __enter__(self) -> "GenerationSession":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # what the sampler tells us -------------------------------------------------------------
    def on_denoiser(self, cond_rows: int, uncond_rows: int, step: int | None, total_steps: int | None) -> None:
        """Called before each denoiser step with the rows it stacked: all cond rows, then uncond rows."""
        self._row_roles = [True] * cond_rows + [False] * uncond_rows
        self._row_cursor = 0
        self._progress = None if step is None or not total_steps else step / total_steps

    # wrappers --------------------------------------------------------------------------------
    def _wrap_entry(self, forward: Forward) -> Forward:
        def entry(*args: Any, **kwargs: Any) -> Any:
            h = forward(*args, **kwargs)
            self._call = _CallState(latent_hw=(int(h.shape[-2]), int(h.shape[-1])),
                                    cond_mask=self._take_rows(int(h.shape[0]), h))
            return h

        return entry

    def _make_site_wrapper(self, level: int) -> Callable[[Forward], Forward]:
        def make(forward: Forward) -> Forward:
            def site(*args: Any, **kwargs: Any) -> Any:
                h = forward(*args, **kwargs)
                residual = self._residual(level, h)
                return h if residual is None else h + residual

            return site

        return make

    def _make_attn2_wrapper(self, site: IPSite, attn: nn.Module) -> Callable[[Forward], Forward]:
        def make(forward: Forward) -> Forward:
            def attn2(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if self.style_units and "context" in kwargs and kwargs["context"] is not None:
                    kwargs["context"] = self._with_style_tokens(kwargs["context"])
                units = [(u, u.scale_at(site)) for u in self.ip_units if in_window(self._progress, u.start, u.end)]
                units = [(u, s) for u, s in units if s != 0.0]
                if not units:
                    return forward(x, *args, **kwargs)  # the text attention, as the WebUI computes it
                with capture_query(attn, x) as captured:
                    out = forward(x, *args, **kwargs)
                call = self._call
                cond_mask = call.cond_mask if call is not None else None
                latent_hw = call.latent_hw if call is not None else None
                added = image_attention(attn, x, units, site, cond_mask, latent_hw, query=captured.get("q"))
                return out + added.to(out.dtype)

            return attn2

        return make

    def _with_style_tokens(self, context: torch.Tensor) -> torch.Tensor:
        active = [u for u in self.style_units if in_window(self._progress, u.start, u.end)]
        if not active:
            return context
        cond_mask = self._call.cond_mask if self._call is not None else None
        extra = [u.context_for(context.shape[0], cond_mask, context) for u in active]
        return torch.cat([context, *extra], dim=1)

    def _take_rows(self, rows: int, h: torch.Tensor) -> torch.Tensor | None:
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
        return torch.tensor(chunk, dtype=h.dtype, device=h.device)

    def _residual(self, level: int, h: torch.Tensor) -> torch.Tensor | None:
        call = self._call
        if call is None:
            return None
        total: torch.Tensor | None = None
        for unit in self.t2i_units:
            if not in_window(self._progress, unit.unit.start, unit.unit.end):
                continue
            feature = fit_feature(unit.features(call.latent_hw, h.device)[level], h).to(h.dtype)
            feature = feature * unit.scales[level]
            if unit.cond_rows_only and call.cond_mask is not None:
                feature = feature * call.cond_mask.view(-1, 1, 1, 1)
            total = feature if total is None else total + feature
        return total

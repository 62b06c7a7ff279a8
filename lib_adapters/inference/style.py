"""The style T2I-Adapter family: CLIP ViT-L/14 image tokens appended to the text context.

The reference images go through the encoder once per job (its final layer's hidden states, cached
like every encoder output), the adapter turns them into ``num_tokens`` context tokens (averaged over
several images), and every cross-attention's text context gets them appended (``Point.CONTEXT``),
scaled by the weight, on cond rows only: uncond rows get zero tokens, as sd-webui-controlnet does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.detect import ModelFamily
from ..formats.t2i import LoadedT2IAdapter
from ..models.t2i_adapter import StyleAdapterConfig
from ..unet.points import Point, UNetCall
from .build import BuildContext, Family
from .runtime import UnitRuntime
from .units import AdapterUnit


@dataclass
class StyleUnitRuntime(UnitRuntime):
    label: str
    tokens: torch.Tensor  # [1, num_tokens, context]
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    points = frozenset({Point.CONTEXT})

    def context_tokens(self, rows: int, call: UNetCall | None, like: torch.Tensor) -> torch.Tensor:
        tokens = (self.tokens * self.weight).to(like.device, like.dtype).expand(rows, -1, -1)
        cond_mask = call.cond_mask if call is not None else None
        if cond_mask is not None:
            tokens = tokens * cond_mask.to(like.dtype).view(-1, 1, 1)
        return tokens


def build(ctx: BuildContext, label: str, unit: AdapterUnit, adapter: LoadedT2IAdapter, file: Path) -> StyleUnitRuntime:
    adapter.check_compatible(ctx.bound, label)
    cfg = adapter.config
    assert isinstance(cfg, StyleAdapterConfig)
    path = ctx.encoders.find(True, cfg.width, f"ViT-L/14 (hidden states of width {cfg.width})")
    encoder = ctx.reference_encoder(path)
    with torch.no_grad():
        hidden = encoder.last_hidden_state(ctx.inputs.source_images(label, unit), unit.crop)
        tokens = adapter.module(hidden).mean(dim=0, keepdim=True)
    return StyleUnitRuntime(label, tokens, weight=unit.weight, start=unit.start, end=unit.end)


FAMILY = Family("T2I-Adapter (style)", (ModelFamily.T2I_STYLE,), ("model", "weight", "start", "end", "crop"), build)

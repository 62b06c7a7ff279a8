"""IP-Adapter networks in the reference (tencent-ailab) key layout.

An IP-Adapter file holds an image projection (``image_proj.*``) that turns CLIP vision outputs
into context tokens, and per cross-attention site a pair of bias-free projections
(``ip_adapter.{N}.to_k_ip`` / ``to_v_ip``) that turn those tokens into keys and values. The
projection comes in three forms, each built from a frozen config read off the file's shapes:

- ``LinearProjection`` (base, light, vit-G): pooled ``image_embeds`` -> ``num_tokens`` tokens.
- ``Resampler`` (plus, plus-face): penultimate hidden states -> 16 learned queries (a Perceiver).
- ``MLPProjection`` (full-face): every penultimate hidden state -> one token each (257).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class ProjectionKind(str, Enum):
    LINEAR = "linear"  # ImageProjModel
    RESAMPLER = "resampler"  # Resampler (plus)
    MLP = "mlp"  # MLPProjModel (full-face)

    @property
    def uses_hidden_states(self) -> bool:
        """Plus and full-face read the encoder's penultimate hidden states, not ``image_embeds``."""
        return self is not ProjectionKind.LINEAR


@dataclass(frozen=True)
class ProjectionConfig:
    kind: ProjectionKind
    clip_dim: int  # width of what the encoder hands over (image_embeds or hidden states)
    context_dim: int  # the UNet's cross-attention width
    num_tokens: int  # tokens per image (linear and resampler; MLP keeps the encoder's count)
    resampler_dim: int = 0
    resampler_depth: int = 0
    resampler_heads: int = 0
    resampler_ff_mult: int = 4


class LinearProjection(nn.Module):
    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.config = cfg
        self.proj = nn.Linear(cfg.clip_dim, cfg.num_tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.config.num_tokens, self.config.context_dim)
        return self.norm(tokens)


class MLPProjection(nn.Module):
    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.config = cfg
        self.proj = nn.Sequential(
            nn.Linear(cfg.clip_dim, cfg.clip_dim), nn.GELU(), nn.Linear(cfg.clip_dim, cfg.context_dim),
            nn.LayerNorm(cfg.context_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class _PerceiverAttention(nn.Module):
    """Latents attend to [image tokens, latents]; 64-dim heads as in every released file."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = (self._heads(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))  # split between q and k for fp16 range
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class Resampler(nn.Module):
    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.resampler_dim
        self.latents = nn.Parameter(torch.randn(1, cfg.num_tokens, dim) / dim**0.5)
        self.proj_in = nn.Linear(cfg.clip_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)
        inner = dim * cfg.resampler_ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList([
                _PerceiverAttention(dim, cfg.resampler_heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                              nn.Linear(inner, dim, bias=False)),
            ])
            for _ in range(cfg.resampler_depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden_states.shape[0], -1, -1)
        x = self.proj_in(hidden_states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_projection(cfg: ProjectionConfig) -> nn.Module:
    return {ProjectionKind.LINEAR: LinearProjection, ProjectionKind.RESAMPLER: Resampler,
            ProjectionKind.MLP: MLPProjection}[cfg.kind](cfg)


class IPKeyValue(nn.Module):
    """``to_k_ip`` / ``to_v_ip`` of one cross-attention site."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden, bias=False)


class IPAdapterModel(nn.Module):
    """``image_proj`` plus one ``IPKeyValue`` per attn2 site, keyed by the file's odd numbers."""

    def __init__(self, projection: ProjectionConfig, site_hidden: dict[int, int]):
        super().__init__()
        self.image_proj = build_projection(projection)
        self.ip_adapter = nn.ModuleDict({str(n): IPKeyValue(projection.context_dim, h)
                                         for n, h in sorted(site_hidden.items())})

    def site(self, number: int) -> IPKeyValue:
        return self.ip_adapter[str(number)]

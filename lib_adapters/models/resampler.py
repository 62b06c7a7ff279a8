"""The Perceiver resampler of IP-Adapter Plus and FaceID, in the reference (tencent-ailab) key layout.

Queries attend to the projected inputs and to themselves, ``depth`` times (attention, then a
feed-forward block, each with a residual), and leave through ``proj_out`` and ``norm_out``. The
queries are the resampler's own learned ``latents`` (IP-Adapter Plus: 16 of them over the CLIP
hidden states; FaceID Portrait unnorm: 16 over the face embedding) or are handed in (FaceID Plus:
the identity tokens, which is why its files have no ``latents``).

Keys: ``latents`` (learned queries only), ``proj_in``, ``proj_out``, ``norm_out`` and per layer
``layers.N.0.{norm1,norm2,to_q,to_kv,to_out}`` and ``layers.N.1.{0,1,3}``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DIM_HEAD = 64  # attention heads are 64 wide in every released file: a file's head count is to_q's width / 64


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs, latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
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
    """Inputs [N, L, in_dim] -> [N, num_latents, out_dim] through a Perceiver of width ``dim``.

    ``num_latents`` > 0: learned queries (``latents``), called as ``resampler(inputs)``; 0: no
    learned queries, called as ``resampler(inputs, latents=queries)`` with queries [N, T, dim]."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, depth: int, heads: int, ff_mult: int = 4,
                 num_latents: int = 0):
        super().__init__()
        if num_latents:  # created first, as the reference does (the same random draws for a fresh model)
            self.latents = nn.Parameter(torch.randn(1, num_latents, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        inner = dim * ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                              nn.Linear(inner, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            latents = self.latents.expand(inputs.shape[0], -1, -1)
        x = self.proj_in(inputs)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

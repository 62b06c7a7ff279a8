"""IP-Adapter networks in the reference (tencent-ailab) key layout.

An IP-Adapter file holds an image projection (``image_proj.*``) that turns image features into
context tokens, and per cross-attention site a pair of bias-free projections
(``ip_adapter.{N}.to_k_ip`` / ``to_v_ip``) that turn those tokens into keys and values. That pair
of parts is the shape every IP-Adapter family shares (``ImagePromptModel``; FaceID's projection
reads a face embedding instead, see ``faceid.py``). The CLIP projection comes in three forms
(``IPProjection``), each built from a frozen config read off the file's shapes:

- ``LinearProjection`` (plain: base, light, vit-G): pooled ``image_embeds`` -> ``num_tokens`` tokens.
- ``Resampler`` (plus, plus-face): penultimate hidden states -> 16 learned queries (a Perceiver).
- ``MLPProjection`` (full-face): every penultimate hidden state -> one token each (257).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .resampler import Resampler


class IPProjection(str, Enum):
    """An IP-Adapter's image projection: THE name for it (files, the runtime, training, the API's values)."""

    PLAIN = "plain"  # LinearProjection (the reference's ImageProjModel): ip-adapter_sd15, _light, _vit-G, _sdxl
    PLUS = "plus"  # Resampler: ip-adapter-plus_*, plus-face
    FULL_FACE = "full-face"  # MLPProjection (MLPProjModel): ip-adapter-full-face
    # FaceIDProjection (models/faceid.py): a face embedding, no CLIP features; trained by the Train Adapter tab,
    # loaded by formats/faceid.py (a LoadedIPAdapter never holds one)
    FACEID = "faceid"

    @property
    def uses_hidden_states(self) -> bool:
        """Plus and full-face read the encoder's penultimate hidden states, not ``image_embeds``."""
        return self in (IPProjection.PLUS, IPProjection.FULL_FACE)


@dataclass(frozen=True)
class ProjectionConfig:
    kind: IPProjection
    clip_dim: int  # width of what the encoder hands over (image_embeds or hidden states)
    context_dim: int  # the UNet's cross-attention width
    num_tokens: int  # tokens per image (plain and plus; full-face keeps the encoder's count)
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


def build_projection(cfg: ProjectionConfig) -> nn.Module:
    if cfg.kind is IPProjection.PLUS:
        return Resampler(cfg.clip_dim, cfg.resampler_dim, cfg.context_dim, cfg.resampler_depth, cfg.resampler_heads,
                         cfg.resampler_ff_mult, num_latents=cfg.num_tokens)
    if cfg.kind is IPProjection.FULL_FACE:
        return MLPProjection(cfg)
    return LinearProjection(cfg)


class IPKeyValue(nn.Module):
    """``to_k_ip`` / ``to_v_ip`` of one cross-attention site."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden, bias=False)


class ImagePromptModel(nn.Module):
    """``image_proj`` (any projection to context tokens) plus one ``IPKeyValue`` per attn2 site, keyed by the
    file's odd numbers: what the IP-Adapter runtime reads (``.image_proj``, ``.site(number)``)."""

    def __init__(self, image_proj: nn.Module, context_dim: int, site_hidden: dict[int, int]):
        super().__init__()
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(n): IPKeyValue(context_dim, h) for n, h in sorted(site_hidden.items())})

    def site(self, number: int) -> IPKeyValue:
        return self.ip_adapter[str(number)]


class IPAdapterModel(ImagePromptModel):
    """An IP-Adapter over CLIP image features: the projection of ``projection``'s kind."""

    def __init__(self, projection: ProjectionConfig, site_hidden: dict[int, int]):
        super().__init__(build_projection(projection), projection.context_dim, site_hidden)

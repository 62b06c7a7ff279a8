"""IP-Adapter FaceID image projections, in the reference (tencent-ailab) key layout.

FaceID replaces the CLIP image embedding by a face-recognition (ArcFace) embedding of 512 values:

- ``FaceIDProjection`` (FaceID, FaceID Portrait; reference ``MLPProjModel``): an MLP from the
  embedding to ``num_tokens`` context tokens (4; 16 for Portrait), each layer-normed.
  Keys: ``proj.0`` [hidden, 512], ``proj.2`` [tokens * dim, hidden], ``norm``.
- ``FaceIDPlusProjection`` (FaceID Plus, Plus v2; reference ``ProjPlusModel``): the same MLP's
  tokens become the queries of a Perceiver over the CLIP ViT-H penultimate hidden states of the
  aligned face crop (``perceiver_resampler.*``, the Plus ``Resampler`` without learned latents).
  Plus v2 was trained with a shortcut: ``out = id_tokens + s_scale * perceiver(id_tokens, clip)``;
  Plus uses the perceiver output alone. ``s_scale`` weighs the face structure seen by CLIP.
- ``FaceIDResamplerProjection`` (FaceID Portrait SDXL "unnorm"): the Plus ``Resampler`` (learned
  latents) reading the raw, not normalised, embedding as a one-token sequence: [N, 1, 512] -> 16 tokens.

``FaceIDAdapterModel`` pairs a projection with the per-attn2 ``to_k_ip``/``to_v_ip`` of the file
(``IPKeyValue``), the shape the IP-Adapter runtime reads (``.image_proj``, ``.site(number)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .ip_adapter import IPKeyValue, ProjectionConfig, ProjectionKind, Resampler

FACE_EMBEDDING_DIM = 512


class FaceIDKind(str, Enum):
    MLP = "mlp"  # FaceID, FaceID Portrait
    PLUS = "plus"  # FaceID Plus, Plus v2
    RESAMPLER = "resampler"  # FaceID Portrait SDXL unnorm

    @property
    def uses_clip(self) -> bool:
        return self is FaceIDKind.PLUS

    @property
    def normed_embedding(self) -> bool:
        """Whether the projection takes the unit-length embedding (the unnorm model takes the raw one)."""
        return self is not FaceIDKind.RESAMPLER


@dataclass(frozen=True)
class FaceIDConfig:
    kind: FaceIDKind
    context_dim: int  # the UNet's cross-attention width (768 SD1.5, 2048 SDXL)
    num_tokens: int  # tokens per face (4; 16 for Portrait)
    id_dim: int = FACE_EMBEDDING_DIM
    id_hidden: int = 2 * FACE_EMBEDDING_DIM  # width of the MLP's hidden layer
    clip_dim: int = 0  # Plus: width of the CLIP hidden states (1280 for ViT-H)
    perceiver_dim: int = 0  # Plus: the perceiver's width (the context width in every released file); unnorm: 1280
    perceiver_depth: int = 0
    perceiver_heads: int = 0  # 64-wide heads
    perceiver_ff_mult: int = 4

    def perceiver_config(self) -> ProjectionConfig:
        """The Plus resampler's config: for Plus the perceiver over CLIP (its queries are the identity
        tokens), for unnorm the whole projection over the face embedding (``id_dim`` wide)."""
        width = self.id_dim if self.kind is FaceIDKind.RESAMPLER else self.clip_dim
        return ProjectionConfig(ProjectionKind.RESAMPLER, clip_dim=width, context_dim=self.context_dim,
                                num_tokens=self.num_tokens, resampler_dim=self.perceiver_dim,
                                resampler_depth=self.perceiver_depth, resampler_heads=self.perceiver_heads,
                                resampler_ff_mult=self.perceiver_ff_mult)


class FaceIDProjection(nn.Module):
    """Face embedding [N, 512] -> identity tokens [N, num_tokens, context_dim]."""

    def __init__(self, cfg: FaceIDConfig):
        super().__init__()
        self.config = cfg
        self.proj = nn.Sequential(nn.Linear(cfg.id_dim, cfg.id_hidden), nn.GELU(),
                                  nn.Linear(cfg.id_hidden, cfg.context_dim * cfg.num_tokens))
        self.norm = nn.LayerNorm(cfg.context_dim)

    def id_tokens(self, face_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(face_embeds).reshape(-1, self.config.num_tokens, self.config.context_dim)
        return self.norm(tokens)

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
                s_scale: float = 1.0, shortcut: bool = False) -> torch.Tensor:
        if clip_hidden is not None:
            raise ValueError("FaceID (not Plus) takes no CLIP hidden states")
        return self.id_tokens(face_embeds)


class FacePerceiver(Resampler):
    """The Plus ``Resampler`` whose queries are the identity tokens instead of learned latents."""

    def __init__(self, cfg: ProjectionConfig):
        super().__init__(cfg)
        del self.latents  # not in FaceID Plus files: the queries come from the face embedding

    def forward(self, latents: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.proj_in(hidden_states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceIDPlusProjection(FaceIDProjection):
    """Face embedding [N, 512] and CLIP hidden states [N, T, clip_dim] -> [N, num_tokens, context_dim]."""

    def __init__(self, cfg: FaceIDConfig):
        super().__init__(cfg)
        self.perceiver_resampler = FacePerceiver(cfg.perceiver_config())

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
                s_scale: float = 1.0, shortcut: bool = False) -> torch.Tensor:
        if clip_hidden is None:
            raise ValueError("FaceID Plus needs the CLIP hidden states of the aligned face crop")
        tokens = self.id_tokens(face_embeds)
        out = self.perceiver_resampler(tokens, clip_hidden)
        return tokens + s_scale * out if shortcut else out


class FaceIDResamplerProjection(Resampler):
    """Raw face embedding [N, 512] -> [N, num_tokens, context_dim] through the Plus resampler."""

    def __init__(self, cfg: FaceIDConfig):
        super().__init__(cfg.perceiver_config())

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,  # type: ignore[override]
                s_scale: float = 1.0, shortcut: bool = False) -> torch.Tensor:
        if clip_hidden is not None:
            raise ValueError("FaceID Portrait takes no CLIP hidden states")
        return super().forward(face_embeds[:, None, :])


def build_faceid_projection(cfg: FaceIDConfig) -> nn.Module:
    """The projection for ``cfg``; every kind is called as ``proj(face_embeds, clip_hidden, s_scale, shortcut)``."""
    if cfg.kind is FaceIDKind.PLUS:
        return FaceIDPlusProjection(cfg)
    if cfg.kind is FaceIDKind.RESAMPLER:
        return FaceIDResamplerProjection(cfg)
    return FaceIDProjection(cfg)


class FaceIDAdapterModel(nn.Module):
    """``image_proj`` (a FaceID projection) plus one ``IPKeyValue`` per attn2 site, keyed by the file's numbers."""

    def __init__(self, cfg: FaceIDConfig, site_hidden: dict[int, int]):
        super().__init__()
        self.image_proj = build_faceid_projection(cfg)
        self.ip_adapter = nn.ModuleDict({str(n): IPKeyValue(cfg.context_dim, h) for n, h in sorted(site_hidden.items())})

    def site(self, number: int) -> IPKeyValue:
        return self.ip_adapter[str(number)]

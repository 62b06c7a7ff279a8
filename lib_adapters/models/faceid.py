"""IP-Adapter FaceID image projections, in the reference (tencent-ailab) key layout.

FaceID replaces the CLIP image embedding by a face-recognition (ArcFace) embedding of 512 values.
``FaceIDVariant`` names the released models; each variant fixes its projection:

- ``FaceIDProjection`` (FaceID, FaceID Portrait; reference ``MLPProjModel``): an MLP from the
  embedding to ``num_tokens`` context tokens (4; 16 for Portrait), each layer-normed.
  Keys: ``proj.0`` [hidden, 512], ``proj.2`` [tokens * dim, hidden], ``norm``.
- ``FaceIDPlusProjection`` (FaceID Plus, Plus v2; reference ``ProjPlusModel``): the same MLP's
  tokens become the queries of a Perceiver over the CLIP ViT-H penultimate hidden states of the
  aligned face crop (``perceiver_resampler.*``: a ``Resampler`` without learned latents).
  Plus v2 was trained with a shortcut: ``out = id_tokens + s_scale * perceiver(id_tokens, clip)``;
  Plus uses the perceiver output alone. ``s_scale`` weighs the face structure seen by CLIP.
- ``FaceIDResamplerProjection`` (FaceID Portrait SDXL "unnorm"): a ``Resampler`` with learned
  latents reading the raw, not normalised, embedding as a one-token sequence: [N, 1, 512] -> 16 tokens.

``FaceIDAdapterModel`` pairs a projection with the per-attn2 ``to_k_ip``/``to_v_ip`` of the file: an
``ImagePromptModel``, the shape the IP-Adapter runtime reads (``.image_proj``, ``.site(number)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .ip_adapter import ImagePromptModel
from .resampler import Resampler

FACE_EMBEDDING_DIM = 512


class FaceIDVariant(str, Enum):
    """The released FaceID models: THE name for a FaceID file's kind (its projection follows from it)."""

    FACEID = "FaceID"
    PORTRAIT = "FaceID Portrait"
    PORTRAIT_UNNORM = "FaceID Portrait (unnorm)"  # SDXL: a Resampler over the raw embedding
    PLUS = "FaceID Plus"
    PLUS_V2 = "FaceID Plus v2"  # the keys of Plus; trained with the shortcut

    @property
    def uses_clip(self) -> bool:
        """Plus reads CLIP hidden states of the aligned face crop besides the face embedding."""
        return self in (FaceIDVariant.PLUS, FaceIDVariant.PLUS_V2)

    @property
    def normed_embedding(self) -> bool:
        """Whether the projection takes the unit-length embedding (the unnorm model takes the raw one)."""
        return self is not FaceIDVariant.PORTRAIT_UNNORM

    @property
    def shortcut(self) -> bool:
        """Plus v2 adds the identity tokens back onto the perceiver's output, weighted by ``s_scale``."""
        return self is FaceIDVariant.PLUS_V2


@dataclass(frozen=True)
class FaceIDConfig:
    variant: FaceIDVariant
    context_dim: int  # the UNet's cross-attention width (768 SD1.5, 2048 SDXL)
    num_tokens: int  # tokens per face (4; 16 for Portrait)
    id_dim: int = FACE_EMBEDDING_DIM
    id_hidden: int = 2 * FACE_EMBEDDING_DIM  # width of the MLP's hidden layer
    clip_dim: int = 0  # Plus: width of the CLIP hidden states (1280 for ViT-H)
    perceiver_dim: int = 0  # Plus: the perceiver's width (the context width in every released file); unnorm: 1280
    perceiver_depth: int = 0
    perceiver_heads: int = 0  # 64-wide heads
    perceiver_ff_mult: int = 4

    def perceiver_shape(self) -> tuple[int, int, int, int, int, int]:
        """``Resampler``'s (in_dim, dim, out_dim, depth, heads, ff_mult): for Plus the perceiver over CLIP (its
        queries are the identity tokens), for unnorm the whole projection over the face embedding."""
        width = self.clip_dim if self.variant.uses_clip else self.id_dim
        return (width, self.perceiver_dim, self.context_dim, self.perceiver_depth, self.perceiver_heads,
                self.perceiver_ff_mult)


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
                s_scale: float = 1.0) -> torch.Tensor:
        if clip_hidden is not None:
            raise ValueError("FaceID (not Plus) takes no CLIP hidden states")
        return self.id_tokens(face_embeds)


class FaceIDPlusProjection(FaceIDProjection):
    """Face embedding [N, 512] and CLIP hidden states [N, T, clip_dim] -> [N, num_tokens, context_dim]."""

    def __init__(self, cfg: FaceIDConfig):
        super().__init__(cfg)
        self.perceiver_resampler = Resampler(*cfg.perceiver_shape())  # no latents: the identity tokens query

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
                s_scale: float = 1.0) -> torch.Tensor:
        if clip_hidden is None:
            raise ValueError("FaceID Plus needs the CLIP hidden states of the aligned face crop")
        tokens = self.id_tokens(face_embeds)
        out = self.perceiver_resampler(clip_hidden, latents=tokens)
        return tokens + s_scale * out if self.config.variant.shortcut else out


class FaceIDResamplerProjection(Resampler):
    """Raw face embedding [N, 512] -> [N, num_tokens, context_dim] through a Resampler with learned latents."""

    def __init__(self, cfg: FaceIDConfig):
        super().__init__(*cfg.perceiver_shape(), num_latents=cfg.num_tokens)

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,  # type: ignore[override]
                s_scale: float = 1.0) -> torch.Tensor:
        if clip_hidden is not None:
            raise ValueError("FaceID Portrait takes no CLIP hidden states")
        return super().forward(face_embeds[:, None, :])


def build_faceid_projection(cfg: FaceIDConfig) -> nn.Module:
    """The projection for ``cfg``; every variant's is called as ``proj(face_embeds, clip_hidden, s_scale)``."""
    if cfg.variant.uses_clip:
        return FaceIDPlusProjection(cfg)
    if cfg.variant is FaceIDVariant.PORTRAIT_UNNORM:
        return FaceIDResamplerProjection(cfg)
    return FaceIDProjection(cfg)


class FaceIDAdapterModel(ImagePromptModel):
    """A FaceID projection plus one ``IPKeyValue`` per attn2 site, keyed by the file's numbers."""

    def __init__(self, cfg: FaceIDConfig, site_hidden: dict[int, int]):
        super().__init__(build_faceid_projection(cfg), cfg.context_dim, site_hidden)

"""The IP-Adapter family: image tokens once per job, decoupled attention added at every attn2.

At each cross-attention the binding calls the forward that is current (the WebUI's chosen
attention: sdp, xformers, sub-quadratic, ... untouched) and the session adds, for every IP unit,
``scale * W_out @ attention(to_q(x), to_k_ip(tokens), to_v_ip(tokens))`` (``Point.ATTENTION``).
``to_out`` is linear, so adding the image branch after it (without its bias, already in the text
output) equals the reference's "add before to_out". Cond rows attend to the image tokens, uncond
rows to the uncond tokens, by the row layout of the call.

Two things keep the per-step cost small (bench/ip_overhead_cputime.py): the query is the one the
text attention computed (the binding catches it, see ``unet/a1111.capture_query``; it is recomputed
only when the current attention did not call ``to_q`` on this very input), and ``W_out`` is folded
into the image values once per job: per head h, ``A_h V_h W_out_h^T = A_h (V_h W_out_h^T)``, so each
step attends to 16 (or 4) precomputed rows of width ``dim`` instead of applying ``W_out`` to every
position.

The image tokens (the adapter's projection of the encoder outputs, averaged or concatenated over the
reference images) are kept in the encoding cache by adapter file, encoding and multi-image mode
(``TokenKey``): a repeated unit costs neither an encoder pass nor a projection.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..formats.detect import ModelFamily
from ..formats.ip import LoadedIPAdapter
from ..models.clip_vision import CropMode
from ..unet.layout import IPSite
from ..unet.points import Point, UNetCall, current_weight
from .blocks import block_weights
from .build import BuildContext, Family
from .cache import FileKey
from .encodings import EncoderOutput, EncodingKey, ReferenceEncoder
from .runtime import UnitRuntime
from .units import AdapterUnit, MultiImage


@dataclass
class IPUnitRuntime(UnitRuntime):
    label: str
    adapter: LoadedIPAdapter
    cond_tokens: torch.Tensor  # [1, T, context]
    uncond_tokens: torch.Tensor  # [1, T, context]
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    block_weights: dict[int, float] | None = None  # call-order block index -> factor; None = all 1
    mask: torch.Tensor | None = None  # [H, W] in [0, 1]: where the image prompt acts (regional prompting)
    _kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    points = frozenset({Point.ATTENTION})

    @classmethod
    def from_encoder_outputs(cls, label: str, adapter: LoadedIPAdapter, cond: torch.Tensor, uncond: torch.Tensor,
                             multi: MultiImage = MultiImage.AVERAGE, **kwargs) -> "IPUnitRuntime":
        """``cond``: encoder outputs of N reference images; ``uncond``: of the "no image" input."""
        tokens, empty = project_tokens(adapter, cond, uncond, multi)
        return cls(label, adapter, tokens, empty, **kwargs)

    def scale_at(self, site: IPSite) -> float:
        factor = 1.0 if self.block_weights is None else self.block_weights.get(site.block_index, 0.0)
        return self.weight * factor

    def attends(self, site: IPSite) -> bool:
        return self.scale_at(site) != 0.0

    def attention(self, site: IPSite, attn: nn.Module, q: torch.Tensor, call: UNetCall | None) -> torch.Tensor:
        """``scale * to_out_linear(attention(q, k_ip, v_ip))`` [rows, tokens, dim] for one attn2 call."""
        cond_mask = call.cond_mask if call is not None else None
        # the weight to_out computes with now (a FaceID LoRA's delta on it included, however the host applies it);
        # read only when the folded values are not cached yet (it may cost a LoRA's up @ down)
        cached = (site.number, q.device, q.dtype) in self._kv
        out_weight = attn.to_out[0].weight if cached else current_weight(attn.to_out[0])
        k, v = self.key_value(site, cond_mask, q, int(attn.heads), out_weight)
        # [b, heads, n, dim] summed over heads == W_out applied to the concatenated heads
        out = F.scaled_dot_product_attention(q, k, v).sum(dim=1) * self.scale_at(site)
        region = self.mask_for(call.latent_hw if call is not None else None, q.shape[2], out)
        return out if region is None else out * region

    def key_value(self, site: IPSite, cond_mask: torch.Tensor | None, like: torch.Tensor, heads: int,
                  out_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: K as [rows, heads, T, head_dim] and V with ``W_out`` folded in as [rows, heads, T, dim].
        Computed once per site, device and dtype (``W_out`` does not change during a generation)."""
        cache_key = (site.number, like.device, like.dtype)
        if cache_key not in self._kv:
            kv = self.adapter.model.site(site.number).to(like.device)
            tokens = torch.cat([self.cond_tokens, self.uncond_tokens]).to(like.device)
            with torch.no_grad():
                k, v = fold_key_value(kv.to_k_ip(tokens), kv.to_v_ip(tokens), heads, out_weight)
            self._kv[cache_key] = (k.to(like.dtype), v.to(like.dtype))
        k, v = self._kv[cache_key]
        rows = like.shape[0]
        if cond_mask is None:  # roles unknown: every row is a cond row
            return k[:1].expand(rows, -1, -1, -1), v[:1].expand(rows, -1, -1, -1)
        pick = (1 - cond_mask).long()  # 0 -> cond tokens, 1 -> uncond tokens
        return k[pick], v[pick]

    def mask_for(self, latent_hw: tuple[int, int] | None, tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """The mask on this layer's grid as [1, tokens, 1], or None (no mask, or the grid is unknown)."""
        if self.mask is None or latent_hw is None:
            return None
        key = (latent_hw, tokens, like.device, like.dtype)
        if key not in self._masks:
            grid = layer_grid(latent_hw, tokens)
            if grid is None:
                return None
            resized = F.interpolate(self.mask[None, None].float(), size=grid, mode="bilinear", align_corners=False)
            self._masks[key] = resized.reshape(1, tokens, 1).to(like.device, like.dtype)
        return self._masks[key]

    def release(self) -> None:
        self._kv.clear()
        self._masks.clear()
        self.adapter.model.to("cpu")


def project_tokens(adapter: LoadedIPAdapter, cond: torch.Tensor, uncond: torch.Tensor,
                   multi: MultiImage = MultiImage.AVERAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens [1, T, context] of N reference images' encoder outputs, and the "no image" tokens of
    the same shape; several images are averaged, or their tokens concatenated."""
    proj = adapter.model.image_proj
    with torch.no_grad():
        tokens = proj(cond.float())
        empty = proj(uncond.float())[:1]
    if multi is MultiImage.CONCAT:
        tokens = tokens.reshape(1, -1, tokens.shape[-1])
        empty = empty.repeat(1, tokens.shape[1] // empty.shape[1], 1)
    else:
        tokens = tokens.mean(dim=0, keepdim=True)
    return tokens, empty


def fold_key_value(k: torch.Tensor, v: torch.Tensor, heads: int, out_weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``to_k_ip``/``to_v_ip`` outputs [rows, T, inner] -> K [rows, heads, T, head_dim] and V with ``W_out``
    folded in, [rows, heads, T, dim] (differentiable in ``k`` and ``v``, for training)."""
    rows, count, inner = k.shape
    head_dim = inner // heads
    k = k.reshape(rows, count, heads, head_dim).transpose(1, 2)
    w = out_weight.detach().to(v.device, v.dtype).reshape(-1, heads, head_dim)  # [dim, heads, head_dim]
    v = torch.einsum("rthd,ehd->rhte", v.reshape(rows, count, heads, head_dim), w)
    return k, v


def layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int] | None:
    """The (h, w) of an attention layer with ``tokens`` positions: the latent halved k times (rounding
    up, as the UNet's stride-2 convolutions do)."""
    h, w = latent_hw
    for _ in range(6):
        if h * w == tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    return None


@dataclass(frozen=True)
class TokenKey:
    """An IP unit's image tokens in the encoding cache: the adapter file, the images' encoding, the multi-image mode."""

    adapter: FileKey
    encoding: EncodingKey  # the reference images' encoding (the "no image" one follows from it)
    multi: MultiImage


def cached_tokens(encoder: ReferenceEncoder, adapter: LoadedIPAdapter, adapter_file: FileKey,
                  images: Sequence[np.ndarray], crop: CropMode, multi: MultiImage) -> tuple[torch.Tensor, torch.Tensor]:
    """An IP unit's image tokens and "no image" tokens (``project_tokens`` of the encoder's outputs), cached."""
    hidden_states = adapter.encoder_need.hidden_states
    output = EncoderOutput.PENULTIMATE if hidden_states else EncoderOutput.IMAGE_EMBEDS
    key = TokenKey(adapter_file, encoder.encoding_key(images, crop, output), multi)

    def compute() -> torch.Tensor:
        tokens, empty = project_tokens(adapter, *encoder.ip_outputs(images, crop, hidden_states), multi)
        return torch.cat([tokens, empty])  # one entry: both are [1, T, context]

    both = encoder.encodings.get(key, compute)
    return both[:1], both[1:]


def build(ctx: BuildContext, label: str, unit: AdapterUnit, adapter: LoadedIPAdapter, file: Path) -> IPUnitRuntime:
    """Encode and project the reference images once for the whole job (or not at all when the same images
    went through the same encoder and adapter before); the tokens serve every step and pass."""
    adapter.check_compatible(ctx.bound, label)
    need = adapter.encoder_need
    encoder = ctx.reference_encoder(ctx.encoders.find(need.hidden_states, need.width, need.description))
    tokens, empty = cached_tokens(encoder, adapter, FileKey.of(file), ctx.inputs.source_images(label, unit), unit.crop,
                                  unit.multi_image)
    return IPUnitRuntime(
        label, adapter, tokens, empty, weight=unit.weight, start=unit.start, end=unit.end,
        block_weights=block_weights(unit.block_preset, ctx.bound.arch, unit.composition_weight),
        mask=ctx.inputs.mask(label, unit.mask))


FAMILY = Family("IP-Adapter", (ModelFamily.IP_ADAPTER,),
                ("model", "weight", "start", "end", "block_preset", "composition_weight", "multi_image", "crop"), build)

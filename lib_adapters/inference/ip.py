"""IP-Adapter runtime: image tokens once per job, decoupled attention added at every attn2.

At each cross-attention the session calls the forward that is current (the WebUI's chosen
attention: sdp, xformers, sub-quadratic, ... untouched) and adds, for every IP unit,
``scale * W_out @ attention(to_q(x), to_k_ip(tokens), to_v_ip(tokens))``. ``to_out`` is linear,
so adding the image branch after it (without its bias, already in the text output) equals the
reference's "add before to_out". Cond rows attend to the image tokens, uncond rows to the
uncond tokens, by the row layout the denoiser reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F

from ..formats.ip import LoadedIPAdapter
from ..unet.layout import IPSite


class MultiImage(str, Enum):
    AVERAGE = "Average"  # one set of tokens: the mean over reference images
    CONCAT = "Concatenate"  # N sets of tokens side by side


@dataclass
class IPUnitRuntime:
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

    @classmethod
    def from_encoder_outputs(cls, label: str, adapter: LoadedIPAdapter, cond: torch.Tensor, uncond: torch.Tensor,
                             multi: MultiImage = MultiImage.AVERAGE, **kwargs) -> "IPUnitRuntime":
        """``cond``: encoder outputs of N reference images; ``uncond``: of the "no image" input."""
        proj = adapter.model.image_proj
        with torch.no_grad():
            tokens = proj(cond.float())
            empty = proj(uncond.float())[:1]
        if multi is MultiImage.CONCAT:
            tokens = tokens.reshape(1, -1, tokens.shape[-1])
            empty = empty.repeat(1, tokens.shape[1] // empty.shape[1], 1)
        else:
            tokens = tokens.mean(dim=0, keepdim=True)
        return cls(label, adapter, tokens, empty, **kwargs)

    def scale_at(self, site: IPSite) -> float:
        factor = 1.0 if self.block_weights is None else self.block_weights.get(site.block_index, 0.0)
        return self.weight * factor

    def key_value(self, site: IPSite, cond_mask: torch.Tensor | None, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V per row ([rows, T, inner]); computed once per site, device and dtype."""
        cache_key = (site.number, like.device, like.dtype)
        if cache_key not in self._kv:
            kv = self.adapter.model.site(site.number).to(like.device)
            tokens = torch.cat([self.cond_tokens, self.uncond_tokens]).to(like.device)
            with torch.no_grad():
                self._kv[cache_key] = (kv.to_k_ip(tokens).to(like.dtype), kv.to_v_ip(tokens).to(like.dtype))
        k, v = self._kv[cache_key]
        rows = like.shape[0]
        if cond_mask is None:  # roles unknown: every row is a cond row
            return k[:1].expand(rows, -1, -1), v[:1].expand(rows, -1, -1)
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


def layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int] | None:
    """The (h, w) of an attention layer with ``tokens`` positions: the latent halved k times (rounding
    up, as the UNet's stride-2 convolutions do)."""
    h, w = latent_hw
    for _ in range(6):
        if h * w == tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    return None


def image_attention(attn: torch.nn.Module, x: torch.Tensor, units: list[tuple[IPUnitRuntime, float]],
                    site: IPSite, cond_mask: torch.Tensor | None,
                    latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum over units of ``scale * to_out_linear(attention(q, k_ip, v_ip))`` for one attn2 call."""
    heads = int(attn.heads)
    q = attn.to_q(x)
    b, n, inner = q.shape
    q = q.view(b, n, heads, inner // heads).transpose(1, 2)
    total: torch.Tensor | None = None
    for unit, scale in units:
        k, v = unit.key_value(site, cond_mask, q)
        k = k.reshape(b, -1, heads, inner // heads).transpose(1, 2)
        v = v.reshape(b, -1, heads, inner // heads).transpose(1, 2)
        out = (F.scaled_dot_product_attention(q, k, v) * scale).transpose(1, 2).reshape(b, n, inner)
        region = unit.mask_for(latent_hw, n, out)
        if region is not None:
            out = out * region
        total = out if total is None else total + out
    assert total is not None
    return F.linear(total, attn.to_out[0].weight)

"""IP-Adapter runtime: image tokens once per job, decoupled attention added at every attn2.

At each cross-attention the session calls the forward that is current (the WebUI's chosen
attention: sdp, xformers, sub-quadratic, ... untouched) and adds, for every IP unit,
``scale * W_out @ attention(to_q(x), to_k_ip(tokens), to_v_ip(tokens))``. ``to_out`` is linear,
so adding the image branch after it (without its bias, already in the text output) equals the
reference's "add before to_out". Cond rows attend to the image tokens, uncond rows to the
uncond tokens, by the row layout the denoiser reported.

Two things keep the per-step cost small (bench/ip_overhead_cputime.py): the query is the one the
text attention computed (caught by a forward hook on ``to_q`` for the duration of the call, never
recomputed unless the current attention did not call ``to_q`` on this very input), and ``W_out`` is
folded into the image values once per job: per head h, ``A_h V_h W_out_h^T = A_h (V_h W_out_h^T)``,
so each step attends to 16 (or 4) precomputed rows of width ``dim`` instead of applying ``W_out``
to every position.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

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
        tokens, empty = project_tokens(adapter, cond, uncond, multi)
        return cls(label, adapter, tokens, empty, **kwargs)

    def scale_at(self, site: IPSite) -> float:
        factor = 1.0 if self.block_weights is None else self.block_weights.get(site.block_index, 0.0)
        return self.weight * factor

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


@contextlib.contextmanager
def capture_query(attn: torch.nn.Module, x: torch.Tensor) -> Iterator[dict]:
    """While the text attention runs, keep what ``attn.to_q`` returns for exactly this ``x``."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        if inputs and inputs[0] is x and "q" not in captured:
            captured["q"] = output

    handle = attn.to_q.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def image_attention(attn: torch.nn.Module, x: torch.Tensor, units: list[tuple[IPUnitRuntime, float]],
                    site: IPSite, cond_mask: torch.Tensor | None,
                    latent_hw: tuple[int, int] | None = None, query: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over units of ``scale * to_out_linear(attention(q, k_ip, v_ip))`` for one attn2 call.
    ``query``: ``to_q(x)`` as the text attention computed it, if caught (see ``capture_query``)."""
    heads = int(attn.heads)
    q = query if query is not None and query.shape[:2] == x.shape[:2] else attn.to_q(x)
    b, n, inner = q.shape
    q = q.view(b, n, heads, inner // heads).transpose(1, 2)
    out_weight = attn.to_out[0].weight
    total: torch.Tensor | None = None
    for unit, scale in units:
        k, v = unit.key_value(site, cond_mask, q, heads, out_weight)
        # [b, heads, n, dim] summed over heads == W_out applied to the concatenated heads
        out = F.scaled_dot_product_attention(q, k, v).sum(dim=1) * scale
        region = unit.mask_for(latent_hw, n, out)
        if region is not None:
            out = out * region
        total = out if total is None else total + out
    assert total is not None
    return total

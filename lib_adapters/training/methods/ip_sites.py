"""Where IP-Adapter weights sit in a training backend's UNet: ldm/sgm through ``unet/layout.py``, and the same
table read off a diffusers ``UNet2DConditionModel``.

Both give ``IPSite``s numbered as the reference files are: the ``k``-th cross-attention in the order of
diffusers' ``attn_processors`` (down blocks, up blocks, mid block) has key number ``2k + 1``. The diffusers
view offers what ``GenerationSession`` reads from a ``BoundLayout`` (``arch``, ``layout.entry``,
``module()``, ``ip_sites()``), so training installs the panel's own attn2 wrapper on either UNet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...arch import BaseArch
from ...errors import IncompatibleModelError
from ...unet.layout import BoundLayout, IPSite, bind_layout
from ..backends.base import TrainingBackend


@dataclass(frozen=True)
class _Entry:
    entry: str  # the first module of every UNet call (the session reads the latent size off its output)


@dataclass(frozen=True)
class DiffusersIPLayout:
    arch: BaseArch
    unet: nn.Module
    sites: tuple[IPSite, ...]
    layout: _Entry = _Entry("conv_in")

    def module(self, path: str) -> nn.Module:
        return self.unet.get_submodule(path)

    def ip_sites(self) -> tuple[IPSite, ...]:
        return self.sites


def diffusers_ip_sites(unet: nn.Module) -> tuple[IPSite, ...]:
    """attn2 sites of a diffusers UNet, numbered like the reference's files, with their call-order block."""
    paths = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    if not paths:
        raise IncompatibleModelError("this diffusers UNet has no cross-attention (attn2) layers for an IP-Adapter")
    parents = list(dict.fromkeys(p.split(".transformer_blocks.")[0] for p in paths))
    call_order = [p for prefix in ("down_blocks", "mid_block", "up_blocks") for p in parents if p.startswith(prefix)]
    index = {p: n for n, p in enumerate(call_order)}
    return tuple(IPSite(number=2 * k + 1, path=path, block_index=index[path.split(".transformer_blocks.")[0]],
                        hidden=int(unet.get_submodule(path).to_k.out_features)) for k, path in enumerate(paths))


def ip_layout(backend: TrainingBackend) -> BoundLayout | DiffusersIPLayout:
    unet = backend.unet
    if hasattr(unet, "attn_processors"):
        return DiffusersIPLayout(backend.arch, unet, diffusers_ip_sites(unet))
    return bind_layout(unet)


def copy_key_values(model, sites: tuple[IPSite, ...], bound) -> None:
    """The reference's start for a new adapter: each site's ``to_k_ip``/``to_v_ip`` a copy of its ``to_k``/``to_v``
    (``model.site(n)``: any IP model, plain, Plus or FaceID)."""
    with torch.no_grad():
        for site in sites:
            attn, kv = bound.module(site.path), model.site(site.number)
            kv.to_k_ip.weight.copy_(attn.to_k.weight.detach().float())
            kv.to_v_ip.weight.copy_(attn.to_v.weight.detach().float())

"""Stand-ins for Forge's own IP-Adapter and ControlNet, patching a generation the way the real ones do.

``TheirIPAdapter`` registers, like ``sd_forge_ipadapter``'s ``apply_ipadapter``, an attn2 *replace* patch
per cross-attention: an object (deep-copied with its modules on every later clone) called with the
projected ``q, k, v``; it returns the text attention plus ``weight`` times an attention over its own
image tokens, cond rows attending to the image tokens and uncond rows to zeros, picked per chunk by
``cond_or_uncond``. ``TheirControlNet`` is a linked-list ControlNet (``add_patched_controlnet``) whose
``get_control`` returns residuals for the T2I blocks of an SD1 UNet and the middle block, the input list
reversed so ``apply_control``'s pops hand input block ``i`` its entry. ``script(...)`` wraps either in an
AlwaysVisible script whose ``process_before_every_sampling`` clones ``forge_objects.unet``, applies it and
sets the clone back, as Forge's ControlNet extension does.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from .unet import attention_heads

CALLS: Counter = Counter()  # "ip": replace-patch calls, "controlnet": get_control calls (shared by deep copies)


class TheirIPAdapter(nn.Module):
    def __init__(self, unet: nn.Module, weight: float = 1.0, tokens: int = 4, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        context_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
        self.tokens = nn.Parameter(torch.randn(1, tokens, context_dim, generator=generator), requires_grad=False)
        self.sites: list[tuple[str, int, int]] = []
        self.to_k_ip, self.to_v_ip = nn.ModuleList(), nn.ModuleList()
        for kind, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
            for number, block in enumerate(blocks):
                if len(block) > 1 and hasattr(block[1], "transformer_blocks"):
                    for depth, tb in enumerate(block[1].transformer_blocks):
                        inner = tb.attn2.to_k.out_features
                        k, v = nn.Linear(context_dim, inner, bias=False), nn.Linear(context_dim, inner, bias=False)
                        for layer in (k, v):
                            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * 0.2
                        self.sites.append((kind, number, depth))
                        self.to_k_ip.append(k)
                        self.to_v_ip.append(v)
        self.weight = weight

    def patch(self, unet_patcher: Any) -> None:
        for index, (kind, number, depth) in enumerate(self.sites):
            unet_patcher.set_model_attn2_replace(_Replace(self, index), kind, number, depth)


class _Replace:
    """One site's replace patch; deep-copied (with the adapter) on every later clone, like Forge's."""

    def __init__(self, adapter: TheirIPAdapter, index: int):
        self.adapter, self.index = adapter, index

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        adapter = self.adapter
        CALLS["ip"] += 1
        heads = extra_options["n_heads"]
        out = attention_heads(q, k, v, heads)
        chunks = extra_options["cond_or_uncond"]
        per_chunk = q.shape[0] // len(chunks)
        tokens = adapter.tokens.to(q)
        ip_k = torch.cat([adapter.to_k_ip[self.index](tokens if role == 0 else torch.zeros_like(tokens))
                          .expand(per_chunk, -1, -1) for role in chunks])
        ip_v = torch.cat([adapter.to_v_ip[self.index](tokens if role == 0 else torch.zeros_like(tokens))
                          .expand(per_chunk, -1, -1) for role in chunks])
        return out + adapter.weight * attention_heads(q, ip_k, ip_v, heads)


class TheirControlNet:
    """A ControlNet in Forge's linked list: residuals after input blocks 2, 5, 8, 11 and the middle block."""

    def __init__(self, unet: nn.Module, strength: float = 1.0, seed: int = 0):
        self.previous_controlnet = None
        self.transformer_options: dict = {}
        self.strength, self.seed = strength, seed
        self.channels = [unet.model_channels * m for m in unet.channel_mult]
        self.blocks = len(unet.input_blocks)

    def pre_run(self, model: Any) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def get_control(self, x: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int) -> dict:
        CALLS["controlnet"] += 1
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x, t, cond, batched_number)
        generator = torch.Generator().manual_seed(self.seed)
        rows, _, height, width = x.shape
        per_block: list[torch.Tensor | None] = [None] * self.blocks
        for level, channels in enumerate(self.channels):
            scale = 2 ** level
            feature = torch.randn(1, channels, height // scale, width // scale, generator=generator) * self.strength
            per_block[3 * level + 2] = feature.expand(rows, -1, -1, -1).to(x)
        middle = per_block[-1].clone()
        out = {"input": list(reversed(per_block)), "middle": [middle], "output": []}
        if previous is not None:
            for name in ("input", "middle"):
                out[name] = [a if b is None else (b if a is None else a + b) for a, b in zip(out[name], previous[name])]
        return out

    def apply(self, unet_patcher: Any) -> None:
        unet_patcher.add_patched_controlnet(self)


def script(name: str, make: Any) -> type:
    """An AlwaysVisible script titled ``name`` that applies ``make(unet_module)`` to a clone of the pass's
    UNet patcher in ``process_before_every_sampling`` (``make`` returns a TheirIPAdapter/TheirControlNet)."""
    from modules import scripts

    class TheirScript(scripts.Script):
        def title(self):
            return name

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process_before_every_sampling(self, p, *args, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            thing = make(unet.model.diffusion_model)
            (thing.patch if isinstance(thing, TheirIPAdapter) else thing.apply)(unet)
            p.sd_model.forge_objects.unet = unet

    TheirScript.__name__ = name.replace(" ", "")
    return TheirScript

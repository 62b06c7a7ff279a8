"""The one table that tells model families apart by their keys, never by file name.

``detect_family`` returns the family of a flat state dict and, for T2I-Adapters, its key layout.
Families the extension
cannot use in a given place (a ControlNet, a LoRA, a whole checkpoint) are recognised too, so the
error can say what the file is instead of "unknown".
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from ..errors import FormatError
from .faceid_keys import is_faceid_keys
from .state_dict import StateDict


class ModelFamily(str, Enum):
    T2I_FULL = "T2I-Adapter"
    T2I_LIGHT = "T2I-Adapter (light)"
    T2I_STYLE = "T2I-Adapter (style)"
    IP_ADAPTER = "IP-Adapter"
    IP_FACEID = "IP-Adapter FaceID"
    CONTROLNET = "ControlNet"
    LORA = "LoRA"
    CHECKPOINT = "Stable Diffusion checkpoint"

    @property
    def is_t2i(self) -> bool:
        return self in (ModelFamily.T2I_FULL, ModelFamily.T2I_LIGHT, ModelFamily.T2I_STYLE)


class T2ILayout(str, Enum):
    """The key layout of a T2I-Adapter file: THE name for it (detection, conversion, training's export)."""

    TENCENTARC = "tencentarc"  # body.N.* keys (optionally with an "adapter." prefix): what sd-webui-controlnet,
    #                            ComfyUI and our panel load
    DIFFUSERS = "diffusers"  # adapter.body.L.resnets.J.* keys: diffusers' ``T2IAdapter``


@dataclass(frozen=True)
class Signature:
    family: ModelFamily
    layout: T2ILayout | None  # T2I-Adapters only: other families have one layout each
    matches: Callable[[StateDict], bool]


def _has(*keys: str) -> Callable[[StateDict], bool]:
    return lambda sd: all(k in sd for k in keys)


def _has_prefixes(*prefixes: str) -> Callable[[StateDict], bool]:
    return lambda sd: all(any(k.startswith(p) for k in sd) for p in prefixes)


def _any_contains(*parts: str) -> Callable[[StateDict], bool]:
    return lambda sd: any(p in k for k in sd for p in parts)


# Order matters: the first match wins, so more specific signatures come first.
SIGNATURES: tuple[Signature, ...] = (
    Signature(ModelFamily.T2I_LIGHT, T2ILayout.DIFFUSERS,
              _has("adapter.body.0.in_conv.weight", "adapter.body.0.out_conv.weight", "adapter.body.0.resnets.0.block1.weight")),
    Signature(ModelFamily.T2I_FULL, T2ILayout.DIFFUSERS,
              _has("adapter.conv_in.weight", "adapter.body.0.resnets.0.block1.weight")),
    Signature(ModelFamily.T2I_FULL, T2ILayout.TENCENTARC, _has("conv_in.weight", "body.0.block1.weight")),
    Signature(ModelFamily.T2I_LIGHT, T2ILayout.TENCENTARC,
              _has("body.0.in_conv.weight", "body.0.out_conv.weight", "body.0.body.0.block1.weight")),
    Signature(ModelFamily.T2I_STYLE, T2ILayout.TENCENTARC, _has("style_embedding", "proj", "ln_pre.weight")),
    # FaceID files have an IP-Adapter's two halves too: their signature (projection keys, LoRA keys) goes first
    Signature(ModelFamily.IP_FACEID, None, is_faceid_keys),
    Signature(ModelFamily.IP_ADAPTER, None, _has_prefixes("image_proj.", "ip_adapter.")),
    Signature(ModelFamily.CONTROLNET, None,
              _any_contains("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")),
    Signature(ModelFamily.LORA, None, _any_contains("lora_down.weight", "lora_A.weight", "lora_up.weight")),
    Signature(ModelFamily.CHECKPOINT, None, _any_contains("model.diffusion_model.input_blocks.0.0.weight")),
)


def strip_adapter_prefix(sd: StateDict) -> dict[str, torch.Tensor]:
    """TencentARC files sometimes prefix every key with ``adapter.``; diffusers files always do."""
    keys = list(sd)
    is_diffusers = any(".resnets." in k for k in keys)
    if keys and not is_diffusers and all(k.startswith("adapter.") for k in keys):
        return {k[len("adapter."):]: v for k, v in sd.items()}
    return dict(sd)


def detect_family(sd: StateDict, source: str = "the file"
                  ) -> tuple[ModelFamily, T2ILayout | None, dict[str, torch.Tensor]]:
    """Family, key layout (T2I-Adapters) and the (prefix-normalised) state dict; ``FormatError`` when unknown."""
    normalised = strip_adapter_prefix(sd)
    for sig in SIGNATURES:
        if sig.matches(normalised):
            return sig.family, sig.layout, normalised
    sample = ", ".join(sorted(normalised)[:5])
    raise FormatError(
        f"{source}: not a recognised adapter file (first keys: {sample}). Expected a T2I-Adapter "
        "(TencentARC or diffusers layout) or an IP-Adapter (image_proj/ip_adapter keys)."
    )

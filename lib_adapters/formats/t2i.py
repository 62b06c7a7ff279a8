"""T2I-Adapter files: config from shapes, TencentARC <-> diffusers key conversion, strict loading.

Everything about an adapter (full/light/style, SD1.x/2.x or SDXL, 1-channel or RGB input,
channel widths, blocks per level) is read from tensor shapes. The in-memory modules use the
TencentARC layout; diffusers-layout files are converted on load, and ``to_diffusers`` writes
the other way for export.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..arch import cross_attention_dim
from ..errors import FormatError, IncompatibleModelError
from ..models.t2i_adapter import SpatialAdapterConfig, StyleAdapterConfig, T2IKind, build_adapter
from .detect import ModelFamily, T2ILayout, detect_family
from .reader import read_weights
from .state_dict import StateDict, load_strict, numbered

if TYPE_CHECKING:  # only for the annotation: formats never need the UNet's table
    from ..unet.layout import BoundLayout

NUM_LEVELS = 4  # every T2I-Adapter produces four feature levels (one per injection site)
_SD_UNSHUFFLE, _XL_UNSHUFFLE = 8, 16


@dataclass(frozen=True)
class LoadedT2IAdapter:
    """A ready adapter module (fp32, CPU, eval) and what it is."""

    name: str
    module: nn.Module
    config: SpatialAdapterConfig | StyleAdapterConfig
    family: ModelFamily

    def check_compatible(self, bound: "BoundLayout", label: str) -> None:
        """``IncompatibleModelError`` unless this adapter fits that UNet: a spatial adapter's base and feature
        widths, the style adapter's token width (the text context's)."""
        cfg = self.config
        if isinstance(cfg, StyleAdapterConfig):
            context = cross_attention_dim(bound.unet)
            if cfg.context_dim != context:
                raise IncompatibleModelError(
                    f"{label}: '{self.name}' makes {cfg.context_dim}-wide context tokens but this checkpoint's "
                    f"text context is {context} wide; the style adapter is for SD1.x.")
            return
        if cfg.sdxl != bound.arch.is_sdxl:
            kind = "SDXL" if cfg.sdxl else "SD1.x/SD2.x"
            raise IncompatibleModelError(
                f"{label}: '{self.name}' is an {kind} T2I-Adapter but the loaded checkpoint is "
                f"{bound.arch.value}. Pick an adapter made for {bound.arch.value}.")
        if tuple(cfg.channels) != bound.t2i_channels:
            raise IncompatibleModelError(
                f"{label}: '{self.name}' produces features of widths {cfg.channels} but this UNet "
                f"expects {bound.t2i_channels}.")


def _unshuffle_for(in_channels: int, source: str) -> tuple[int, bool]:
    """PixelUnshuffle factor and SDXL flag from conv_in's input width (1 or 3 image channels)."""
    for factor, sdxl in ((_SD_UNSHUFFLE, False), (_XL_UNSHUFFLE, True)):
        if in_channels in (factor**2, 3 * factor**2):
            return factor, sdxl
    raise FormatError(
        f"{source}: conv_in takes {in_channels} channels, which matches no T2I-Adapter "
        "(64/192 for SD1.x/2.x, 256/768 for SDXL)."
    )


def full_config(sd: StateDict, source: str) -> SpatialAdapterConfig:
    """Config of a TencentARC-layout full adapter."""
    if any(".skep." in k for k in sd):
        raise FormatError(f"{source}: uses the unreleased 'sk=False' adapter variant, which is not supported.")
    blocks = numbered(sd, r"body\.(\d+)\.block1\.weight$")
    if not blocks or len(blocks) % NUM_LEVELS or blocks != list(range(len(blocks))):
        raise FormatError(f"{source}: expected {NUM_LEVELS} levels of body blocks, found blocks {blocks}.")
    per_level = len(blocks) // NUM_LEVELS
    channels = tuple(int(sd[f"body.{lvl * per_level}.block1.weight"].shape[0]) for lvl in range(NUM_LEVELS))
    in_channels = int(sd["conv_in.weight"].shape[1])
    unshuffle, sdxl = _unshuffle_for(in_channels, source)
    return SpatialAdapterConfig(
        kind=T2IKind.FULL,
        in_channels=in_channels,
        channels=channels,
        num_res_blocks=per_level,
        unshuffle=unshuffle,
        kernel_size=int(sd["body.0.block2.weight"].shape[-1]),
        conv_downsample=any(k.endswith("down_opt.op.weight") for k in sd),
        sdxl=sdxl,
    )


def light_config(sd: StateDict, source: str) -> SpatialAdapterConfig:
    """Config of a TencentARC-layout light (colour) adapter."""
    levels = numbered(sd, r"body\.(\d+)\.out_conv\.weight$")
    if levels != list(range(NUM_LEVELS)):
        raise FormatError(f"{source}: expected {NUM_LEVELS} light extractors, found {levels}.")
    in_channels = int(sd["body.0.in_conv.weight"].shape[1])
    unshuffle, sdxl = _unshuffle_for(in_channels, source)
    return SpatialAdapterConfig(
        kind=T2IKind.LIGHT,
        in_channels=in_channels,
        channels=tuple(int(sd[f"body.{i}.out_conv.weight"].shape[0]) for i in levels),
        num_res_blocks=len(numbered(sd, r"body\.0\.body\.(\d+)\.block1\.weight$")),
        unshuffle=unshuffle,
        sdxl=sdxl,
    )


def style_config(sd: StateDict) -> StyleAdapterConfig:
    # Head count is not visible in shapes; every released style adapter uses 8.
    return StyleAdapterConfig(
        width=int(sd["style_embedding"].shape[2]),
        context_dim=int(sd["proj"].shape[1]),
        num_tokens=int(sd["style_embedding"].shape[1]),
        num_layers=len(numbered(sd, r"transformer_layes\.(\d+)\.ln_1\.weight$")),
    )


def diffusers_to_tencentarc(sd: StateDict, light: bool) -> dict[str, torch.Tensor]:
    """``adapter.body.{i}.resnets.{j}.*`` -> ``body.{i*n+j}.*`` (full) or ``body.{i}.body.{j}.*`` (light)."""
    per_level = len(numbered(sd, r"adapter\.body\.0\.resnets\.(\d+)\.block1\.weight$"))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith("adapter."):
            raise FormatError(f"unexpected key '{key}' in a diffusers-layout T2I-Adapter")
        key = key[len("adapter."):]
        m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)$", key)
        if m:
            level, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            key = f"body.{level}.body.{j}.{rest}" if light else f"body.{level * per_level + j}.{rest}"
        elif not light:
            m = re.match(r"body\.(\d+)\.in_conv\.(.*)$", key)
            if m:
                key = f"body.{int(m.group(1)) * per_level}.in_conv.{m.group(2)}"
        out[key] = value
    return out


def tencentarc_to_diffusers(sd: StateDict, cfg: SpatialAdapterConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``diffusers_to_tencentarc`` for export."""
    out: dict[str, torch.Tensor] = {}
    n = cfg.num_res_blocks
    for key, value in sd.items():
        if cfg.kind is T2IKind.LIGHT:
            key = re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", key)
        else:
            m = re.match(r"body\.(\d+)\.(in_conv\.)?(.*)$", key)
            if m:
                level, j = divmod(int(m.group(1)), n)
                key = f"body.{level}.in_conv.{m.group(3)}" if m.group(2) else f"body.{level}.resnets.{j}.{m.group(3)}"
        out["adapter." + key] = value
    return out


def diffusers_config(cfg: SpatialAdapterConfig) -> dict:
    """The ``config.json`` diffusers' ``T2IAdapter`` needs for a converted state dict."""
    channels = list(cfg.channels)
    if cfg.kind is T2IKind.LIGHT:
        adapter_type = "light_adapter"
        channels = channels[:-1]  # diffusers' LightAdapter appends the last level itself
    else:
        adapter_type = "full_adapter_xl" if cfg.sdxl else "full_adapter"
    return {
        "adapter_type": adapter_type,
        "in_channels": cfg.image_channels,
        "channels": channels,
        "num_res_blocks": cfg.num_res_blocks,
        "downscale_factor": cfg.unshuffle,
    }


def t2i_from_state_dict(sd: StateDict, name: str = "adapter") -> LoadedT2IAdapter:
    """Build and strictly load an adapter from any supported layout."""
    family, layout, sd = detect_family(sd, name)
    if not family.is_t2i:
        raise FormatError(f"{name}: this is a {family.value} file, not a T2I-Adapter.")
    if layout is T2ILayout.DIFFUSERS:
        sd = diffusers_to_tencentarc(sd, light=family is ModelFamily.T2I_LIGHT)
    if family is ModelFamily.T2I_FULL:
        cfg: SpatialAdapterConfig | StyleAdapterConfig = full_config(sd, name)
    elif family is ModelFamily.T2I_LIGHT:
        cfg = light_config(sd, name)
    else:
        cfg = style_config(sd)
    module = build_adapter(cfg)
    load_strict(module, sd, name)
    return LoadedT2IAdapter(name=name, module=module.eval().requires_grad_(False), config=cfg, family=family)


def load_t2i_adapter(path: str | Path) -> LoadedT2IAdapter:
    path = Path(path)
    return t2i_from_state_dict(read_weights(path), name=path.stem)

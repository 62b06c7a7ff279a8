"""THE table of named UNet sites per architecture, checked against a live UNet.

T2I-Adapter feature ``i`` is added to ``h`` right after ``t2i_sites[i]`` runs, before the UNet
stores it as a skip connection (so the decoder sees it too, as in the TencentARC reference and
diffusers' ``down_intrablock_additional_residuals``). ``entry`` is the first module of every UNet
call; its output has the latent's size, which tells us the resolution and the batch rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import BaseArch, detect_unet_arch
from ..errors import IncompatibleModelError


@dataclass(frozen=True)
class T2ISite:
    path: str  # dotted module path inside the UNet
    level: int  # index into channel_mult: the width of h at this site is model_channels * mult[level]


@dataclass(frozen=True)
class UNetLayout:
    arch_family: str
    num_input_blocks: int
    entry: str
    t2i_sites: tuple[T2ISite, ...]
    attn_input_blocks: tuple[int, ...]  # input_blocks[i][1] is a SpatialTransformer
    attn_output_blocks: tuple[int, ...]  # output_blocks[i][1] is a SpatialTransformer


@dataclass(frozen=True)
class IPSite:
    """One cross-attention (attn2) and the IP-Adapter weights that belong to it."""

    number: int  # the file's key number: ip_adapter.{number}.to_k_ip (odd; diffusers order down, up, mid)
    path: str  # e.g. "input_blocks.4.1.transformer_blocks.0.attn2"
    block_index: int  # SpatialTransformer index in call order (input, middle, output): per-block weights
    hidden: int  # attn2's inner width: to_k_ip's output size


_SD12 = UNetLayout(
    arch_family="SD1.x/SD2.x",
    num_input_blocks=12,
    entry="input_blocks.0",
    t2i_sites=(T2ISite("input_blocks.2", 0), T2ISite("input_blocks.5", 1),
               T2ISite("input_blocks.8", 2), T2ISite("input_blocks.11", 3)),
    attn_input_blocks=(1, 2, 4, 5, 7, 8),
    attn_output_blocks=(3, 4, 5, 6, 7, 8, 9, 10, 11),
)
# SDXL: the first feature goes after the first Downsample (block 3), the last after the middle block.
_SDXL = UNetLayout(
    arch_family="SDXL",
    num_input_blocks=9,
    entry="input_blocks.0",
    t2i_sites=(T2ISite("input_blocks.3", 0), T2ISite("input_blocks.5", 1),
               T2ISite("input_blocks.8", 2), T2ISite("middle_block", 2)),
    attn_input_blocks=(4, 5, 7, 8),
    attn_output_blocks=(0, 1, 2, 3, 4, 5),
)
LAYOUTS: dict[BaseArch, UNetLayout] = {BaseArch.SD1: _SD12, BaseArch.SD2: _SD12, BaseArch.SDXL: _SDXL}


@dataclass(frozen=True)
class BoundLayout:
    """A layout checked against one UNet instance."""

    arch: BaseArch
    layout: UNetLayout
    unet: nn.Module
    t2i_channels: tuple[int, ...]

    def module(self, path: str) -> nn.Module:
        return self.unet.get_submodule(path)

    def ip_sites(self) -> tuple[IPSite, ...]:
        """Every attn2 with its file key number and call-order block index, read off this UNet."""
        layout = self.layout
        inputs = [f"input_blocks.{i}.1" for i in layout.attn_input_blocks]
        outputs = [f"output_blocks.{i}.1" for i in layout.attn_output_blocks]
        call_order = {path: n for n, path in enumerate(inputs + ["middle_block.1"] + outputs)}
        sites = []
        for path in inputs + outputs + ["middle_block.1"]:  # diffusers' attn_processors order
            blocks = getattr(self.module(path), "transformer_blocks", None)
            if blocks is None:
                raise IncompatibleModelError(f"{layout.arch_family} UNet: '{path}' is not a spatial transformer")
            for j, block in enumerate(blocks):
                attn2 = block.attn2
                sites.append(IPSite(number=2 * len(sites) + 1, path=f"{path}.transformer_blocks.{j}.attn2",
                                    block_index=call_order[path], hidden=int(attn2.to_k.out_features)))
        return tuple(sites)


def bind_layout(unet: nn.Module) -> BoundLayout:
    """Detect the architecture and check that every named site exists in this UNet."""
    arch = detect_unet_arch(unet)
    layout = LAYOUTS[arch]
    for path in [layout.entry] + [s.path for s in layout.t2i_sites]:
        try:
            unet.get_submodule(path)
        except AttributeError as exc:
            raise IncompatibleModelError(f"{layout.arch_family} UNet has no module '{path}'") from exc
    model_channels = getattr(unet, "model_channels", None)
    mult = getattr(unet, "channel_mult", None)
    if model_channels is None or mult is None:
        raise IncompatibleModelError("the UNet does not expose model_channels/channel_mult; is it an ldm/sgm UNet?")
    channels = tuple(int(model_channels * mult[s.level]) for s in layout.t2i_sites)
    return BoundLayout(arch=arch, layout=layout, unet=unet, t2i_channels=channels)

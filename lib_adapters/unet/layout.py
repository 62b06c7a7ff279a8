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


_SD12 = UNetLayout(
    arch_family="SD1.x/SD2.x",
    num_input_blocks=12,
    entry="input_blocks.0",
    t2i_sites=(T2ISite("input_blocks.2", 0), T2ISite("input_blocks.5", 1),
               T2ISite("input_blocks.8", 2), T2ISite("input_blocks.11", 3)),
)
# SDXL: the first feature goes after the first Downsample (block 3), the last after the middle block.
_SDXL = UNetLayout(
    arch_family="SDXL",
    num_input_blocks=9,
    entry="input_blocks.0",
    t2i_sites=(T2ISite("input_blocks.3", 0), T2ISite("input_blocks.5", 1),
               T2ISite("input_blocks.8", 2), T2ISite("middle_block", 2)),
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

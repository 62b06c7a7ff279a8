"""Base architecture (SD1.x, SD2.x, SDXL) of a loaded UNet, read from its structure."""
from __future__ import annotations

from enum import Enum

from torch import nn

from .errors import IncompatibleModelError


class BaseArch(str, Enum):
    SD1 = "SD1.x"
    SD2 = "SD2.x"
    SDXL = "SDXL"

    @property
    def is_sdxl(self) -> bool:
        return self is BaseArch.SDXL


def cross_attention_dim(unet: nn.Module) -> int | None:
    """Width of the text context, read from the first cross-attention's key projection."""
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return int(module.to_k.in_features)
    return None


def detect_unet_arch(unet: nn.Module) -> BaseArch:
    """SDXL has 9 input blocks; SD1.x and SD2.x have 12 and differ by context width (768 / 1024)."""
    blocks = getattr(unet, "input_blocks", None)
    if blocks is None:
        raise IncompatibleModelError(
            f"{type(unet).__name__} is not an ldm/sgm UNet (no input_blocks); adapters need SD1.x, SD2.x or SDXL."
        )
    if len(blocks) == 9:
        return BaseArch.SDXL
    if len(blocks) == 12:
        return BaseArch.SD2 if cross_attention_dim(unet) == 1024 else BaseArch.SD1
    raise IncompatibleModelError(
        f"the loaded UNet has {len(blocks)} input blocks; adapters support SD1.x/SD2.x (12) and SDXL (9)."
    )

"""Per-block weights of IP-Adapter units: presets as InstantStyle defines them.

Indices are SpatialTransformer blocks in call order (input blocks, middle, output blocks):
SD1.x/2.x have 16 (0-5 input, 6 middle, 7-15 output), SDXL 11 (0-3, 4, 5-10). In SDXL the style
lives in the second output transformer block (``up_blocks.0.attentions.1`` in diffusers' terms)
and the layout in the last input one (``down_blocks.2.attentions.1``).
"""
from __future__ import annotations

from enum import Enum

from ..arch import BaseArch
from ..errors import InputError


class BlockPreset(str, Enum):
    ALL = "All blocks"
    STYLE = "Style"
    COMPOSITION = "Composition"
    STYLE_AND_COMPOSITION = "Style and composition"

    @classmethod
    def parse(cls, value: object) -> "BlockPreset":
        for preset in cls:
            if isinstance(value, str) and value.strip().lower() in (preset.value.lower(), preset.name.lower()):
                return preset
            if value is preset:
                return preset
        raise InputError(f"block preset {value!r} is not one of: {', '.join(p.value for p in cls)}")


_STYLE = {BaseArch.SD1: (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), BaseArch.SDXL: (6,)}
_COMPOSITION = {BaseArch.SD1: {4: 0.25, 5: 1.0}, BaseArch.SDXL: {3: 1.0}}


def block_weights(preset: BlockPreset, arch: BaseArch, composition_weight: float = 1.0) -> dict[int, float] | None:
    """Factor per block (missing blocks: 0); None means every block at full weight."""
    if preset is BlockPreset.ALL:
        return None
    key = BaseArch.SDXL if arch.is_sdxl else BaseArch.SD1  # SD2.x shares SD1.x's block structure
    weights: dict[int, float] = {}
    if preset in (BlockPreset.STYLE, BlockPreset.STYLE_AND_COMPOSITION):
        weights.update({i: 1.0 for i in _STYLE[key]})
    if preset is BlockPreset.COMPOSITION:
        weights.update(_COMPOSITION[key])
    if preset is BlockPreset.STYLE_AND_COMPOSITION:
        weights.update({i: f * composition_weight for i, f in _COMPOSITION[key].items()})
    return weights

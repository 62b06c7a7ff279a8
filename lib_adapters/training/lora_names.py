"""kohya LoRA module names for the layers of a loaded ldm/sgm model.

kohya's sd-scripts names a LoRA module ``prefix + "." + module path`` with every "." turned into
"_" (``networks/lora.py`` ``create_modules``). The module path is the one of *kohya's own* UNet:

* SD1.x/SD2.x: kohya's ``library/original_unet.py`` uses diffusers names, so files carry e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``; the WebUI's Lora
  extension turns them back into ldm names with ``convert_diffusers_name_to_compvis``.
* SDXL: kohya's ``library/sdxl_original_unet.py`` uses sgm names, so files carry e.g.
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the WebUI maps them by replacing
  ``lora_unet`` with ``diffusion_model`` (its "SDXL loras seem to already have correct compvis keys").
* Text encoders (transformers CLIP names): ``lora_te_`` (SD1/2), ``lora_te1_``/``lora_te2_`` (SDXL).

So for SD1/SD2 the ldm path of each trained layer is converted to its diffusers path here; this is
the inverse of the WebUI's regexes (tests run the WebUI's mapping over every saved key).
"""
from __future__ import annotations

from torch import nn

from ..arch import BaseArch
from ..errors import IncompatibleModelError

_RESNET_SUFFIX = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def _resnet_suffix(rest: str, path: str) -> str:
    if rest not in _RESNET_SUFFIX:
        raise IncompatibleModelError(f"no kohya name for the ResBlock layer {path!r}")
    return _RESNET_SUFFIX[rest]


def _component(unet: nn.Module, blocks: str, index: int, slot: int) -> str:
    block = getattr(unet, blocks) if blocks == "middle_block" else getattr(unet, blocks)[index]
    return type(block[slot]).__name__


def ldm_to_diffusers_path(path: str, unet: nn.Module) -> str:
    """The diffusers module path of an ldm UNet layer (``input_blocks.1.1.proj_in`` -> ``down_blocks.0.attentions.0.proj_in``)."""
    parts = path.split(".")
    head = parts[0]
    if head == "middle_block":
        slot, rest = int(parts[1]), ".".join(parts[2:])
        kind = _component(unet, head, 0, slot)
        if kind == "SpatialTransformer":
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{slot // 2}.{_resnet_suffix(rest, path)}"
    if head not in ("input_blocks", "output_blocks") or len(parts) < 4:
        raise IncompatibleModelError(f"no kohya name for the UNet layer {path!r} (only blocks' layers are trained)")
    index, slot, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    kind = _component(unet, head, index, slot)
    if head == "input_blocks":
        level, j = divmod(index - 1, 3)
        side = "down_blocks"
    else:
        level, j = divmod(index, 3)
        side = "up_blocks"
    if kind == "SpatialTransformer":
        return f"{side}.{level}.attentions.{j}.{rest}"
    if kind == "ResBlock":
        return f"{side}.{level}.resnets.{j}.{_resnet_suffix(rest, path)}"
    if kind == "Downsample" and rest == "op":
        return f"down_blocks.{level}.downsamplers.0.conv"
    if kind == "Upsample" and rest == "conv":
        return f"up_blocks.{level}.upsamplers.0.conv"
    raise IncompatibleModelError(f"no kohya name for the UNet layer {path!r} ({kind})")


_LDM_RESNET = {v: k for k, v in _RESNET_SUFFIX.items()}


def diffusers_to_ldm_path(path: str, unet: nn.Module) -> str:
    """The ldm/sgm path of a diffusers ``UNet2DConditionModel`` layer (the inverse of ``ldm_to_diffusers_path``)."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_LDM_RESNET[rest]}"
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        raise IncompatibleModelError(f"no kohya name for the UNet layer {path!r} (only blocks' layers are trained)")
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    down = parts[0] == "down_blocks"
    if kind == "downsamplers":
        return f"input_blocks.{3 + 3 * level}.0.op"
    if kind == "upsamplers":  # after the resnet, and after the attention when the level has one
        slot = 2 if getattr(unet.up_blocks[level], "attentions", None) is not None else 1
        return f"output_blocks.{3 * level + 2}.{slot}.conv"
    index = 1 + 3 * level + j if down else 3 * level + j
    side = "input_blocks" if down else "output_blocks"
    if kind == "attentions":
        return f"{side}.{index}.1.{rest}"
    if kind == "resnets" and rest in _LDM_RESNET:
        return f"{side}.{index}.0.{_LDM_RESNET[rest]}"
    raise IncompatibleModelError(f"no kohya name for the UNet layer {path!r}")


def kohya_unet_name(path: str, unet: nn.Module, arch: BaseArch) -> str:
    """``lora_unet_...`` for a layer of an ldm/sgm UNet, by the convention kohya uses for ``arch``."""
    if arch is BaseArch.SDXL:
        return kohya_name("lora_unet", path)
    return kohya_name("lora_unet", ldm_to_diffusers_path(path, unet))

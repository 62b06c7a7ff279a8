"""The LoRA that goes with an IP-Adapter FaceID model, as weight deltas on the UNet's attention layers.

It comes from one of two places, both rank-128 LoRAs on every attention's q, k, v and out:

- the adapter file itself: FaceID and FaceID Plus files hold the LoRA the reference trained with
  their attention processors (``AttentionLoRA`` records, ``faceid.py``); processor ``n`` is attn1
  of IP site ``n + 1`` when even and attn2 of IP site ``n`` when odd (the site table's numbers);
- the paired file released beside it, ``ip-adapter-faceid*_lora.safetensors`` (tencent-ailab
  converted it from the adapter file, issue #326), in kohya's format: ``lora_unet_<module>.lora_down
  .weight`` / ``.lora_up.weight`` / ``.alpha``, the module named the diffusers way
  (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) or the sgm way
  (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``). Both are mapped onto ldm layers exactly as
  the WebUI's Lora extension maps them (its ``convert_diffusers_name_to_compvis``, then
  ``lora_unet`` -> ``diffusion_model``), so the file acts here as it does as a ``<lora:...>``.

Either way the result is ``{parameter path: LowRankDelta}`` with the LoRA's own scale (``alpha /
rank`` in a kohya file, 1 without alpha and in the adapter file, as the reference applies it) times
the strength asked for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ..errors import FormatError, IncompatibleModelError
from ..unet.points import LowRankDelta, linear_weight
from .detect import ModelFamily, detect_family
from .reader import read_weights

if TYPE_CHECKING:  # annotations only
    from ..unet.layout import BoundLayout
    from .faceid import AttentionLoRA

PAIRED_SUFFIX = "_lora"  # ip-adapter-faceid_sd15.bin -> ip-adapter-faceid_sd15_lora.safetensors
_PART_PATHS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_KOHYA_KEY = re.compile(r"(lora_unet_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# the WebUI's convert_diffusers_name_to_compvis, for the blocks an attention LoRA lives in
_DIFFUSERS_BLOCKS = (
    (re.compile(r"down_blocks_(\d+)_attentions_(\d+)_(.+)"), lambda b, a, rest: f"input_blocks_{1 + 3 * b + a}_1_{rest}"),
    (re.compile(r"up_blocks_(\d+)_attentions_(\d+)_(.+)"), lambda b, a, rest: f"output_blocks_{3 * b + a}_1_{rest}"),
    (re.compile(r"mid_block_attentions_(\d+)_(.+)"), lambda a, rest: f"middle_block_1_{rest}"),
)


@dataclass(frozen=True)
class LoRALayer:
    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    scale: float  # alpha / rank, or 1


@dataclass(frozen=True)
class PairedLoRA:
    """A kohya LoRA file for the UNet: layer (the file's module name without ``lora_unet_``) -> its factors."""

    name: str
    layers: Mapping[str, LoRALayer]

    @property
    def nbytes(self) -> int:  # what the model cache counts for it
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.up, layer.down))


def read_paired_lora(path: str | Path) -> PairedLoRA:
    """A FaceID model's paired LoRA file; ``FormatError`` naming the file when it is not a UNet LoRA in kohya form."""
    path = Path(path)
    sd = read_weights(path)
    family = detect_family(sd, path.name)[0]
    if family is not ModelFamily.LORA:
        raise FormatError(f"{path.name}: this is a {family.value} file, not the LoRA of a FaceID model.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise FormatError(f"{path.name}: {key} is not a kohya UNet LoRA key (lora_unet_<layer>.lora_down.weight, "
                              ".lora_up.weight, .alpha); a FaceID LoRA holds UNet attention layers only.")
        parts.setdefault(match.group(1)[len("lora_unet_"):], {})[match.group(2)] = value
    layers = {}
    for name, group in parts.items():
        if "lora_down.weight" not in group or "lora_up.weight" not in group:
            raise FormatError(f"{path.name}: lora_unet_{name} lacks its lora_down or lora_up weight; the file is "
                              "incomplete.")
        down, up = group["lora_down.weight"], group["lora_up.weight"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise FormatError(f"{path.name}: lora_unet_{name} has factors of shapes {tuple(up.shape)} and "
                              f"{tuple(down.shape)}, not a linear layer's LoRA.")
        alpha = group.get("alpha")
        rank = int(down.shape[0])
        layers[name] = LoRALayer(up, down, float(alpha) / rank if alpha is not None else 1.0)
    return PairedLoRA(path.stem, layers)


def ldm_layer_name(name: str) -> str:
    """A kohya module name (without ``lora_unet_``) as the ldm layer's path with "_" for ".": diffusers names
    converted, sgm names as they are."""
    for pattern, convert in _DIFFUSERS_BLOCKS:
        match = pattern.fullmatch(name)
        if match:
            *numbers, rest = match.groups()
            return convert(*(int(n) for n in numbers), rest)
    return name


def _linear_layers(unet: nn.Module) -> dict[str, str]:
    """Every linear layer of the UNet: its path with "_" for "." -> its path (the Lora extension's layer mapping)."""
    return {path.replace(".", "_"): path for path, module in unet.named_modules() if linear_weight(module) is not None}


def paired_deltas(lora: PairedLoRA, bound: "BoundLayout", strength: float, label: str) -> dict[str, LowRankDelta]:
    """The paired file's layers as deltas on this UNet; ``IncompatibleModelError`` when a layer is missing or of
    another shape (the LoRA of another base model)."""
    layers = _linear_layers(bound.unet)
    deltas = {}
    for name, layer in lora.layers.items():
        path = layers.get(ldm_layer_name(name))
        if path is None:
            raise IncompatibleModelError(f"{label}: the LoRA {lora.name} has a layer lora_unet_{name} that the loaded "
                                         f"{bound.arch.value} checkpoint does not have; it is the LoRA of a FaceID "
                                         "model for another base model.")
        deltas[f"{path}.weight"] = _checked(LowRankDelta(layer.up, layer.down, layer.scale * strength),
                                            bound.unet.get_submodule(path), lora.name, f"lora_unet_{name}", label)
    return deltas


def infile_deltas(records: Mapping[int, "AttentionLoRA"], bound: "BoundLayout", strength: float, name: str,
                  label: str) -> dict[str, LowRankDelta]:
    """The adapter file's own LoRA records as deltas on this UNet's attn1/attn2 layers (scale 1, as trained)."""
    sites = {site.number: site.path for site in bound.ip_sites()}
    deltas = {}
    for number, record in records.items():
        attn2 = sites.get(number + 1 - number % 2)
        if attn2 is None:
            raise IncompatibleModelError(f"{label}: the LoRA in {name} covers attention processor {number}, which "
                                         f"the loaded {bound.arch.value} checkpoint does not have.")
        attention = attn2 if record.is_cross_attention else attn2[:-len("attn2")] + "attn1"
        for part, layer in _PART_PATHS.items():
            path = f"{attention}.{layer}"
            deltas[f"{path}.weight"] = _checked(LowRankDelta(record.up[part], record.down[part], strength),
                                                bound.unet.get_submodule(path), name, f"{number}.to_{part}_lora", label)
    return deltas


def _checked(delta: LowRankDelta, layer: nn.Module, source: str, key: str, label: str) -> LowRankDelta:
    weight = linear_weight(layer)
    if weight is None or tuple(weight.shape) != delta.shape:
        found = type(layer).__name__ if weight is None else tuple(weight.shape)
        raise IncompatibleModelError(f"{label}: {source}'s {key} is a LoRA for a {delta.shape} layer, the loaded "
                                     f"checkpoint's is {found}; the LoRA belongs to another base model.")
    return delta

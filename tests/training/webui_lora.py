"""A faithful re-implementation of how the WebUI's built-in Lora extension (v1.10.1) finds a file's layers.

Written from ``extensions-builtin/Lora/networks.py`` at 82a973c0 (``convert_diffusers_name_to_compvis``,
``assign_network_names_to_compvis_modules``, the key-matching part of ``load_network``) and
``network_lora.py`` / ``lyco_helpers.py`` (which layer types accept LoRA weights, how the update is
merged). Order and fallbacks follow the original: convert -> ``network_layer_mapping`` -> ``[qkv]_proj``
-> parent MHA -> ``lora_unet``->``diffusion_model`` -> ``lora_te1_text_model``->``0_transformer_text_model``
-> ``transformer_text_model``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_DIGITS = re.compile(r"\d+")
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _match(key: str, pattern: str) -> list | None:
    m = re.match(pattern, key)
    if not m:
        return None
    return [int(x) if _DIGITS.match(x) else x for x in m.groups()]


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    if (m := _match(key, r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := _match(key, r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := _match(key, r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := _match(key, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := _match(key, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := _match(key, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := _match(key, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := _match(key, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := _match(key, r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := _match(key, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def network_layer_mapping(sd_model) -> dict[str, nn.Module]:
    """``assign_network_names_to_compvis_modules``: text encoder(s) then ``sd_model.model``, dots -> underscores."""
    mapping: dict[str, nn.Module] = {}
    if sd_model.is_sdxl:
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if not hasattr(embedder, "wrapped"):
                continue
            for name, module in embedder.wrapped.named_modules():
                mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in cond.named_modules():
            mapping[name.replace(".", "_")] = module
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


@dataclass
class Matched:
    sd_key: str
    module: nn.Module
    weights: dict


def match_keys(state_dict: dict, sd_model) -> tuple[dict[str, Matched], dict[str, str]]:
    """(matched layers by WebUI key, unmatched file keys) exactly as ``load_network`` sorts them."""
    mapping = network_layer_mapping(sd_model)
    is_sd2 = "model_transformer_resblocks" in mapping
    matched: dict[str, Matched] = {}
    failed: dict[str, str] = {}
    for key_network, weight in state_dict.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        module = mapping.get(key)
        if module is None and (m := _X_PROJ.match(key)):
            module = mapping.get(m.group(1))
        if module is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            module = mapping.get(key)
        elif module is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            module = mapping.get(key)
            if module is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                module = mapping.get(key)
        if module is None:
            failed[key_network] = key
            continue
        matched.setdefault(key, Matched(key, module, {})).weights[part] = weight
    return matched, failed


def accepts_lora(entry: Matched) -> bool:
    """``ModuleTypeLora.create_module`` + ``NetworkModuleLora.create_module``: keys present, exact layer type."""
    if not all(k in entry.weights for k in ("lora_up.weight", "lora_down.weight")):
        return False
    return type(entry.module) in (nn.Linear, nn.Conv2d, nn.MultiheadAttention,
                                  nn.modules.linear.NonDynamicallyQuantizableLinear)


def merged_delta(entry: Matched, multiplier: float = 1.0) -> torch.Tensor:
    """``calc_updown`` for plain LoRA: ``up @ down`` reshaped to the layer's weight, times alpha/dim."""
    up = entry.weights["lora_up.weight"].float()
    down = entry.weights["lora_down.weight"].float()
    shape = [up.size(0), down.size(1)] + (list(down.shape[2:]) if down.dim() == 4 else [])
    updown = (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)
    alpha = entry.weights.get("alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return updown.reshape(entry.module.weight.shape) * scale * multiplier

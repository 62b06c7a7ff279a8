"""Fake of Forge's built-in LoRA extension's ``networks`` module (main ``extensions-builtin/sd_forge_lora/
networks.py`` + ``extra_networks_lora.py`` at dfdcbab6; Classic ``extensions-builtin/Lora/networks.py`` at 1f95d717;
the same logic in both), LoRA files only. No AGPL code.

What is kept as in the original: ``list_available_networks()`` over ``cmd_opts.lora_dir``; ``load_lora_state_dict``
behind ``functools.lru_cache`` (a file is read once per name); ``load_networks(names, te, unet, dyn)``, which
returns at once when the compiled ``[[filename, unet multiplier, te multiplier], ...]`` equals
``sd_model.current_lora_hash``, and otherwise starts from ``forge_objects_original``'s UNet and CLIP, clones them
with the file's weight patches (``load_lora_for_models``) and stores the result as
``forge_objects_after_applying_lora``. The weights change only when Forge loads that patcher for sampling.

Key matching: a kohya name goes to the model's key with the WebUI's faithful conversion
(``tests/training/webui_lora.py``, ``convert_diffusers_name_to_compvis``) for the UNet and Forge's ``lora_te`` /
``lora_te1`` -> ``clip_l``, ``lora_te2`` -> ``clip_g`` rule for the text encoders; each LoRA becomes Forge's
"diff" weight patch ``up @ down * alpha / rank`` (Forge merges the "lora" form to the same weight).

``install()`` registers the ``lora`` extra network and makes this module ``networks`` (as the extension's folder
on ``sys.path`` does); ``uninstall()`` puts back what was there.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
from safetensors.torch import load_file

from modules import extra_networks, shared

from .patcher import MAIN

available_networks: dict[str, str] = {}  # name -> filename
loaded_networks: list[str] = []
_previous: dict = {}


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename: str) -> dict[str, torch.Tensor]:
    return load_file(filename)


def list_available_networks() -> None:
    available_networks.clear()
    folder = shared.cmd_opts.lora_dir
    os.makedirs(folder, exist_ok=True)
    for root, _, files in os.walk(folder):
        for file in files:
            if file.endswith(".safetensors"):
                available_networks[os.path.splitext(file)[0]] = os.path.join(root, file)


def _by_underscores(module: torch.nn.Module) -> dict[str, str]:
    return {name.replace(".", "_"): name for name, _ in module.named_modules() if name}


def _delta(state: dict, base: str) -> torch.Tensor:
    up, down = state[f"{base}.lora_up.weight"].float(), state[f"{base}.lora_down.weight"].float()
    rank = down.shape[0]
    scale = float(state[f"{base}.alpha"]) / rank if f"{base}.alpha" in state else 1.0
    if down.ndim == 2:
        return up @ down * scale
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1) * scale
    return F_conv(down, up) * scale


def F_conv(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A k x k ``down`` followed by a 1 x 1 ``up`` as one k x k kernel."""
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def lora_patches(state: dict, unet_patcher, clip) -> tuple[dict, dict]:
    """``({unet key: (delta,)}, {clip key: (delta,)})`` for every module of a kohya LoRA file."""
    from webui_lora import convert_diffusers_name_to_compvis

    unet_names = _by_underscores(unet_patcher.model)
    clip_names = _by_underscores(clip.cond_stage_model) if clip is not None else {}
    unet, text = {}, {}
    for base in sorted({k.split(".", 1)[0] for k in state}):
        if base.startswith("lora_unet_"):
            name = convert_diffusers_name_to_compvis(base, False)
            if name == base:  # SDXL files carry ldm names already
                name = "diffusion_model_" + base[len("lora_unet_"):]
            unet[unet_names[name] + ".weight"] = (_delta(state, base),)
        else:
            prefix, _, rest = base.partition("_text_model_")
            encoder = {"lora_te": "clip_l", "lora_te1": "clip_l", "lora_te2": "clip_g"}[prefix]
            text[clip_names[f"{encoder}_transformer_text_model_{rest}"] + ".weight"] = (_delta(state, base),)
    return unet, text


def _add(patcher, patches: dict, filename: str, strength: float):
    if patcher.flavour == MAIN:
        return patcher.add_patches(filename=filename, patches=patches, strength_patch=strength)
    return patcher.add_patches(patches, strength)


def load_lora_for_models(unet, clip, state: dict, strength_model: float, strength_clip: float, filename: str):
    unet_patches, clip_patches = lora_patches(state, unet, clip)
    if unet_patches:
        unet = unet.clone()
        _add(unet, unet_patches, filename, strength_model)
    if clip_patches:
        clip = clip.clone()
        _add(clip.patcher, clip_patches, filename, strength_clip)
    return unet, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    sd = shared.sd_model
    loaded_networks.clear()
    if any(name not in available_networks for name in names):
        list_available_networks()
    targets = [[available_networks[name], unet, te] for name, unet, te in zip(names, unet_multipliers, te_multipliers)]
    loaded_networks.extend(names)
    compiled = str(targets)
    if sd.current_lora_hash == compiled:
        return
    sd.current_lora_hash = compiled
    sd.forge_objects.unet = sd.forge_objects_original.unet
    sd.forge_objects.clip = sd.forge_objects_original.clip
    for filename, strength_model, strength_clip in targets:
        sd.forge_objects.unet, sd.forge_objects.clip = load_lora_for_models(
            sd.forge_objects.unet, sd.forge_objects.clip, load_lora_state_dict(filename), strength_model,
            strength_clip, filename)
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list) -> None:
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te.append(float(params.positional[1]) if len(params.positional) > 1 else 1.0)
            unet.append(float(params.positional[2]) if len(params.positional) > 2 else te[-1])
        load_networks(names, te, unet, [None] * len(names))

    def deactivate(self, p) -> None:
        pass


def install() -> None:
    _previous.update(networks=sys.modules.get("networks"), lora=extra_networks.extra_network_registry.get("lora"))
    sys.modules["networks"] = sys.modules[__name__]
    extra_networks.register_extra_network(ExtraNetworkLora())
    list_available_networks()


def uninstall() -> None:
    if _previous.get("networks") is not None:
        sys.modules["networks"] = _previous["networks"]
    else:
        sys.modules.pop("networks", None)
    if _previous.get("lora") is not None:
        extra_networks.extra_network_registry["lora"] = _previous["lora"]
    else:
        extra_networks.extra_network_registry.pop("lora", None)
    _previous.clear()
    available_networks.clear()
    loaded_networks.clear()
    load_lora_state_dict.cache_clear()

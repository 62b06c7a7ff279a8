"""Fake of Forge's built-in LoRA extension (main ``extensions-builtin/sd_forge_lora``, Classic
``extensions-builtin/Lora``), UNet LoRAs only: ``<lora:name:multiplier>`` in the prompt becomes weight
patches on a clone of the *original* UNet patcher, which then becomes ``forge_objects_after_applying_lora``.

As in both: ``activate`` compares the wanted (file, multiplier) list with ``current_lora_hash`` and does
nothing when it is unchanged; otherwise it starts from ``forge_objects_original.unet``, and for each file
clones the patcher and adds the file's layers as ``("lora", (up, down, alpha, mid, dora))`` patches at
strength ``multiplier`` (main: ``add_patches(filename=..., patches=..., strength_patch=...)``; Classic:
positional), so the prompt's LoRA merges when Forge loads the pass's patcher, ours with it. Layers are
found by the A1111 stub's key mapping (``tests/training/webui_lora.py``), then named as the patcher's
parameters. Text-encoder keys are ignored (the stub has no CLIP patcher).
"""
from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import load_file

from modules import extra_networks, shared

_HELPERS = str(Path(__file__).resolve().parents[1] / "training")


def _match_keys():
    if _HELPERS not in sys.path:
        sys.path.insert(0, _HELPERS)
    from webui_lora import match_keys
    return match_keys


def lora_patches(path: Path, tiny, patcher) -> dict:
    """The file's UNet layers as Forge "lora" patches keyed by the patcher's parameter names."""
    names = {id(module): name for name, module in patcher.model.named_modules()}
    matched, _ = _match_keys()(load_file(str(path)), tiny)
    patches = {}
    for entry in matched.values():
        if id(entry.module) not in names or "lora_up.weight" not in entry.weights:
            continue
        alpha = entry.weights.get("alpha")
        value = (entry.weights["lora_up.weight"], entry.weights["lora_down.weight"],
                 None if alpha is None else float(alpha), None, None)
        patches[f"{names[id(entry.module)]}.weight"] = ("lora", value)
    return patches


class ForgeLora(extra_networks.ExtraNetwork):
    def __init__(self, flavour: str, tiny):
        super().__init__("lora")
        self.flavour, self.tiny = flavour, tiny
        self.applied: list[tuple[str, float]] = []

    def activate(self, p, params_list) -> None:
        wanted = [(params.positional[0], float(params.positional[1]) if len(params.positional) > 1 else 1.0)
                  for params in params_list]
        model = p.sd_model
        if getattr(model, "current_lora_hash", None) == str(wanted):
            return
        model.current_lora_hash = str(wanted)
        unet = model.forge_objects_original.unet
        folder = Path(shared.cmd_opts.lora_dir)
        for name, multiplier in wanted:
            path = next(folder.rglob(f"{name}.safetensors"))
            patches = lora_patches(path, self.tiny, unet)
            unet = unet.clone()
            if self.flavour == "main":
                unet.add_patches(filename=str(path), patches=patches, strength_patch=multiplier)
            else:
                unet.add_patches(patches, multiplier)
        model.forge_objects.unet = unet
        model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
        self.applied = wanted

    def deactivate(self, p) -> None:
        pass


def install(stub) -> ForgeLora:
    """Register Forge's "lora" extra network for the stub's model (undo with ``uninstall``)."""
    network = ForgeLora(stub.flavour, stub.tiny)
    extra_networks.register_extra_network(network)
    stub.model.current_lora_hash = str([])
    return network


def uninstall(stub) -> None:
    extra_networks.extra_network_registry.pop("lora", None)
    stub.model.__dict__.pop("current_lora_hash", None)

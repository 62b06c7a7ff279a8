"""Fake of Forge's model patchers (main ``backend/patcher/{base,unet,lora}.py``, Classic
``ldm_patched/modules/model_patcher.py`` + ``modules_forge/unet_patcher.py``) and of the loader that puts
one patcher of a model in effect at a time (``memory``).

A patcher holds a shared ``model`` (never copied) and what to do to it: ``model_options`` (every
``clone()`` deep-copies it, so closures are shared and objects duplicated), object patches and weight
patches. Weight patches reach the shared weights only when a patcher is *loaded*:

- main: ``add_patches(*, filename, patches, strength_patch, strength_model, online_mode)`` keyed by
  ``(filename, strength_patch, strength_model, online_mode)``; loading runs the model's one
  ``LoraLoader.refresh``: if the identifiers changed, put back every backed-up Parameter object, then set
  merged weights (new Parameters) for the new patches;
- Classic: ``add_patches(patches, strength_patch, strength_model)`` kept per key; loading unloads the other
  clones of the model (``unpatch_model`` puts back their backups), then ``patch_model`` merges this one's.

A patch value ``(tensor,)`` is a "diff": ``weight + strength_patch * tensor``; ``("lora", (up, down, alpha,
mid, ...))`` is a LoRA: ``weight + strength_patch * alpha / rank * (up @ down)`` (alpha None: 1; main's tuple
has a fifth entry, dora_scale, Classic's four; ``mid`` and DoRA are not modelled). Both computed in fp32, the
LoRA's ``up @ down`` made only while that weight is merged, as both patchers do.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

MAIN, CLASSIC = "main", "classic"


def _set_parameter(model: nn.Module, key: str, value: torch.Tensor | nn.Parameter) -> None:
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))


def merge(weight: torch.Tensor, patches: list[tuple[float, Any, float]]) -> torch.Tensor:
    """The weight with ``(strength_patch, value, strength_model)`` patches ("diff" or "lora") applied in fp32."""
    out = weight.detach().to(torch.float32, copy=True)
    for strength, value, strength_model in patches:
        if strength_model != 1.0:
            out *= strength_model
        if len(value) == 1:
            out += strength * value[0].to(out.device, out.dtype)
        elif len(value) == 2 and value[0] == "lora":
            up, down, alpha, mid = value[1][:4]
            if mid is not None or (len(value[1]) > 4 and value[1][4] is not None):
                raise NotImplementedError("the stub merges plain LoRA patches (no LoCon mid, no DoRA)")
            up, down = up.to(out.device, torch.float32), down.to(out.device, torch.float32)
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            out += (strength * scale * (up.flatten(1) @ down.flatten(1))).reshape(out.shape)
        else:
            raise NotImplementedError(f"the stub merges 'diff' and 'lora' patches, not {value[0]!r}")
    return out.to(weight.dtype)


class LoraLoader:
    """Forge main's one-per-model weight merger (``model.lora_loader``), with one backup for all patchers."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.backup: dict[str, nn.Parameter] = {}
        self.loaded_hash = str([])
        self.refresh_count = 0

    @torch.no_grad()
    def refresh(self, lora_patches: dict) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return  # the same identifiers as loaded: nothing is merged again
        self.refresh_count += 1
        for key, original in self.backup.items():
            _set_parameter(self.model, key, original)
        self.backup = {}
        merged: dict[str, list] = {}
        for patches in lora_patches.values():
            for key, entries in patches.items():
                merged.setdefault(key, []).extend(entries)
        for key, entries in merged.items():
            weight = self.model.get_parameter(key)
            self.backup[key] = weight
            _set_parameter(self.model, key, merge(weight, [(s, v, m) for s, v, m, *_ in entries]))
        self.loaded_hash = hashes


class ModelPatcher:
    """The common part of main's and Classic's ``ModelPatcher``; ``flavour`` picks the weight-patch API."""

    flavour = MAIN

    def __init__(self, model: nn.Module, load_device=None, offload_device=None, size: int = 0, current_device=None):
        self.model = model
        self.load_device = load_device or torch.device("cpu")
        self.offload_device = offload_device or torch.device("cpu")
        self.current_device = current_device or self.offload_device
        self.size = size
        self.object_patches: dict[str, Any] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        if self.flavour == MAIN:
            self.lora_patches: dict[tuple, dict] = {}
            if not hasattr(model, "lora_loader"):
                model.lora_loader = LoraLoader(model)
        else:
            self.patches: dict[str, list] = {}
            self.backup: dict[str, torch.Tensor] = {}
            self.model_keys = set(model.state_dict().keys())

    def _copy_into(self, n: "ModelPatcher") -> "ModelPatcher":
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        if self.flavour == MAIN:
            n.lora_patches = self.lora_patches.copy()
        else:
            n.patches = {k: v[:] for k, v in self.patches.items()}
            n.model_keys = self.model_keys
        return n

    def clone(self) -> "ModelPatcher":
        return self._copy_into(type(self)(self.model, self.load_device, self.offload_device, self.size,
                                          self.current_device))

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    # weight patches ----------------------------------------------------------------------------
    def add_patches(self, *, filename: str, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0,
                    online_mode: bool = False) -> set:
        """Forge main: keyword-only, stored under ``(filename, strength_patch, strength_model, online_mode)``;
        only keys of ``model.named_parameters()`` are taken (and returned)."""
        keys = {k for k, _ in self.model.named_parameters()}
        accepted, these = set(), {}
        for key, value in patches.items():
            if key in keys:
                accepted.add(key)
                these.setdefault(key, []).append([strength_patch, value, strength_model, None, None])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = these
        return accepted

    def refresh_loras(self) -> None:  # main
        self.model.lora_loader.refresh(self.lora_patches)

    @torch.no_grad()
    def patch_model(self) -> None:  # Classic
        for key, entries in self.patches.items():
            weight = self.model.get_parameter(key)
            self.backup.setdefault(key, weight.data)
            _set_parameter(self.model, key, merge(weight, entries))

    @torch.no_grad()
    def unpatch_model(self) -> None:  # Classic
        for key, original in self.backup.items():
            _set_parameter(self.model, key, original)
        self.backup = {}

    # model_options -------------------------------------------------------------------------------
    def set_model_patch(self, patch: Callable, name: str) -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch: Callable, name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        if self.flavour == MAIN:  # copy-on-write of the dicts on the way down
            to = dict(self.model_options["transformer_options"])
            to["patches_replace"] = dict(to.get("patches_replace", {}))
            to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
            to["patches_replace"][name][key] = patch
            self.model_options["transformer_options"] = to
        else:
            to = self.model_options["transformer_options"]
            to.setdefault("patches_replace", {}).setdefault(name, {})[key] = patch

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_input_block_patch(self, patch):
        self.set_model_patch(patch, "input_block_patch")

    def set_model_input_block_patch_after_skip(self, patch):
        self.set_model_patch(patch, "input_block_patch_after_skip")

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    def set_model_unet_function_wrapper(self, wrapper: Callable) -> None:
        self.model_options["model_function_wrapper"] = wrapper

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj


class UnetPatcher(ModelPatcher):
    """``ModelPatcher`` plus Forge's UNet extras: the ControlNet linked list (shared by clones), block
    modifiers, conditioning modifiers and the extra models to load for sampling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling: list = []
        self.extra_concat_condition = None

    def clone(self) -> "UnetPatcher":
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_patched_controlnet(self, cnet: Any) -> None:
        cnet.previous_controlnet = self.controlnet_linked_list
        self.controlnet_linked_list = cnet

    def list_controlnets(self) -> list:
        out, pointer = [], self.controlnet_linked_list
        while pointer is not None:
            out.append(pointer)
            pointer = pointer.previous_controlnet
        return out

    def append_model_option(self, k: str, v: Any, ensure_uniqueness: bool = False) -> None:
        values = self.model_options.setdefault(k, [])
        if not (ensure_uniqueness and v in values):
            values.append(v)

    def append_transformer_option(self, k: str, v: Any, ensure_uniqueness: bool = False) -> None:
        values = self.model_options.setdefault("transformer_options", {}).setdefault(k, [])
        if not (ensure_uniqueness and v in values):
            values.append(v)

    def set_transformer_option(self, k: str, v: Any) -> None:
        self.model_options.setdefault("transformer_options", {})[k] = v

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def add_block_modifier(self, modifier, ensure_uniqueness=False):
        self.append_transformer_option("block_modifiers", modifier, ensure_uniqueness)

    def add_block_inner_modifier(self, modifier, ensure_uniqueness=False):
        self.append_transformer_option("block_inner_modifiers", modifier, ensure_uniqueness)

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int) -> None:
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def add_extra_model_patcher_during_sampling(self, model_patcher: Any) -> None:
        self.extra_model_patchers_during_sampling.append(model_patcher)


class _ClassicWeights:
    flavour = CLASSIC

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        """Forge Classic: positional, no name, kept per key; only keys of the model's state dict are taken."""
        accepted = []
        for key, value in patches.items():
            if key in self.model_keys:
                accepted.append(key)
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model))
        return accepted


class ClassicModelPatcher(_ClassicWeights, ModelPatcher):
    pass


class ClassicUnetPatcher(_ClassicWeights, UnetPatcher):
    pass


def unet_patcher_class(flavour: str) -> type[UnetPatcher]:
    return ClassicUnetPatcher if flavour == CLASSIC else UnetPatcher


class Memory:
    """What ``load_models_gpu`` keeps in effect: one loaded patcher per shared model."""

    def __init__(self):
        self.loaded: list[ModelPatcher] = []

    def load(self, patcher: ModelPatcher) -> None:
        if any(p is patcher for p in self.loaded):
            return
        for other in [p for p in self.loaded if p.model is patcher.model]:  # unload_model_clones
            self.loaded.remove(other)
            if other.flavour == CLASSIC:
                other.unpatch_model()
        if patcher.flavour == MAIN:
            patcher.refresh_loras()
        else:
            patcher.patch_model()
        self.loaded.append(patcher)

    def clear(self) -> None:
        """Unload everything: every model gets its original weights back (the stub's end of a Forge session)."""
        for patcher in self.loaded:
            if patcher.flavour == CLASSIC:
                patcher.unpatch_model()
            else:
                patcher.model.lora_loader.refresh({})
        self.loaded = []


memory = Memory()

"""The Train Adapter tab's WebUI glue on Stable Diffusion WebUI Forge (main and Classic).

Everything ``host.TrainingHost`` does on A1111 (folders, queue lock, progress in ``shared.state``, interrupt,
the lists refreshed after publishing) holds on Forge, which keeps those WebUI modules. What differs is the
model (``training/backends/forge.py``) and how it is made ready, in ``training_model``:

* Forge merges a LoRA of the prompt into the shared weights when it *loads* the patcher that carries it
  (main: ``LoraLoader.refresh`` at load, or per call for "online" LoRAs; Classic: ``patch_model``), and its
  own text and VAE code load whatever ``sd_model.forge_objects`` holds at the time. So for the run
  ``forge_objects`` is set to the base objects (``forge_objects_original``), and Forge's own loader
  (``load_models_gpu``: main's ``backend.memory_management``, Classic's ``ldm_patched.modules.model_management``,
  looked up by name like ``webui/host.py`` does) loads their UNet, CLIP and VAE patchers: loading the base
  patchers takes the user's LoRAs out of the weights (and moves them to the GPU). Afterwards ``forge_objects``
  is put back; Forge loads the generation's own patchers, LoRAs merged again, at the next generation.
* Forge builds its weights under ``torch.inference_mode()`` (main's loader) or moves them to the GPU inside a
  generation, which runs under it (both): such inference tensors cannot be saved for backward, so no gradient
  could pass through the frozen UNet. Every inference tensor of the UNet, text encoders and VAE is replaced by
  an ordinary copy, in place (the same ``Parameter`` objects through ``torch.utils.swap_tensors``: main creates
  its ``Parameter`` objects under inference mode, and those have no version counter, which a new ``.data`` does
  not give them; the same values, no second copy kept). They stay ordinary afterwards, which inference does not
  mind.
* While the run goes on, a call of Forge's loader for patchers that are all loaded already returns at once.
  Forge's own code asks to load its patcher at every use (Classic's text encoder before every encode, the VAE
  for every decode of a sample), and the loader then frees memory for it by unloading the *other* models: the
  UNet being trained (with ``--always-offload-from-vram``, every time), whose weights would move to the CPU
  under the run. The loader is put back afterwards.
* Module modes, ``requires_grad`` flags and instance forwards are remembered and restored as on A1111.

After a LoRA is published, Forge's LoRA extension would reuse what it cached for the same file name (its
``load_lora_state_dict`` cache and the model's ``current_lora_hash``): both are cleared so the next generation
reads the new file.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

import torch
from torch import nn

from ...arch import BaseArch, detect_unet_arch
from ...errors import IncompatibleModelError, MissingFileError
from ...training.backends.forge import ForgeBackend
from ...training.config import Method
from ..host import Host, HostKind
from .host import TrainingHost, _lora_extension, _restore_hypernetworks, _unload_hypernetworks, kept_as_it_was

log = logging.getLogger(__name__)

_LOADERS = {HostKind.FORGE: "backend.memory_management", HostKind.FORGE_CLASSIC: "ldm_patched.modules.model_management"}
_QUANTIZED = ("nf4", "fp4", "gguf")  # Forge main's storage dtypes that are not torch floats
RELOAD_LORAS = "adapters-training: reload"  # a current_lora_hash no prompt matches: Forge re-reads its LoRAs


def _ordinary_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make ``param`` (``module.<name>``) an ordinary tensor with the same values, keeping the Python object.

    A ``Parameter`` *created* under inference mode (Forge main's loader builds every weight so) has no version
    counter, and assigning its ``.data`` does not give it one: autograd then fails with "Inference tensors do not
    track version counter" (seen in the real Forge). ``torch.utils.swap_tensors`` gives the same object a new,
    ordinary tensor; its attributes are carried over. Where a swap is refused (another reference to the tensor),
    the module gets the new ``Parameter`` instead."""
    fresh = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    fresh.__dict__.update(param.__dict__)
    try:
        if not hasattr(torch.utils, "swap_tensors"):  # torch before 2.3 (every Forge ships a later one)
            raise RuntimeError("this torch has no swap_tensors")
        torch.utils.swap_tensors(param, fresh)
    except RuntimeError as e:
        log.info("adapters training: %s of %s replaced, not swapped (%s)", name, type(module).__name__, e)
        module._parameters[name] = fresh


def make_ordinary(modules: list[nn.Module]) -> int:
    """Replace every inference tensor (parameter or buffer) of ``modules`` by an ordinary copy (parameters keep
    their Python objects, see ``_ordinary_parameter``); returns how many were replaced."""
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        _ordinary_parameter(module, name, param)
                        count += 1
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        module._buffers[name] = buffer.clone()
                        count += 1
    return count


@contextlib.contextmanager
def loads_of_loaded_models_skipped(loader):
    """``loader.load_models_gpu`` returns at once for patchers that are all loaded already (see the module
    docstring); ``load_model_gpu`` goes through it in both Forges."""
    original = loader.load_models_gpu

    def load_models_gpu(models, *args, **kwargs):
        loaded = {id(m.model) for m in getattr(loader, "current_loaded_models", [])}
        if models and all(id(m) in loaded for m in models):
            return None
        return original(models, *args, **kwargs)

    loader.load_models_gpu = load_models_gpu
    try:
        yield
    finally:
        loader.load_models_gpu = original


class ForgeTrainingHost(TrainingHost):
    """``TrainingHost`` for Forge: the model from ``forge_objects`` (see the module docstring)."""

    def __init__(self, host: Host, **kwargs: Any):
        super().__init__(**kwargs)
        if not host.is_forge:
            raise ValueError("ForgeTrainingHost needs a Forge host")
        self.host = host

    def _objects(self):
        objects = getattr(self._sd_model(), "forge_objects_original", None)
        if objects is None or getattr(objects, "unet", None) is None:
            raise MissingFileError("Forge has no Stable Diffusion checkpoint loaded (forge_objects is missing); load "
                                   "one in the WebUI first")
        return objects

    def check_ready(self, method: str = "lora") -> None:
        self.output_dir(method)
        unet = self._objects().unet
        storage = getattr(unet.model, "storage_dtype", None)
        if str(storage) in _QUANTIZED:
            raise IncompatibleModelError(
                f"the loaded UNet is stored as {storage}, which cannot be trained through; load an fp16, bf16 or fp32 "
                "checkpoint (Settings: Diffusion in Low Bits \"Automatic\") to train here")
        detect_unet_arch(unet.model.diffusion_model)  # Flux, SD3 and the like: refused with a message

    def arch(self) -> BaseArch:
        return detect_unet_arch(self._objects().unet.model.diffusion_model)

    def device(self) -> torch.device:
        """Where Forge loads the UNet to compute (it may sit offloaded between generations)."""
        unet = self._objects().unet
        device = getattr(unet, "load_device", None)
        return torch.device(device) if device is not None else next(unet.model.diffusion_model.parameters()).device

    def make_backend(self, method: str = "lora") -> ForgeBackend:
        from modules import shared
        return ForgeBackend(self._sd_model(), clip_skip=getattr(shared.opts, "CLIP_stop_at_last_layers", None))

    def _loader(self):
        return importlib.import_module(_LOADERS[self.host.kind])

    def _load(self, objects) -> None:
        """Forge's own loader, for the base patchers (their LoRA-free weights, on the compute device)."""
        patchers = [objects.unet] + [getattr(o, "patcher", None) for o in (objects.clip, objects.vae)]
        self._loader().load_models_gpu([p for p in patchers if p is not None])

    @contextlib.contextmanager
    def training_model(self, backend: ForgeBackend):
        model = backend.sd_model
        current = model.forge_objects
        hypernetworks = _unload_hypernetworks()
        model.forge_objects = model.forge_objects_original.shallow_copy()
        try:
            self._load(model.forge_objects)  # loading replaces merged Parameters (Classic): remember after it
            roots = backend.base_modules()
            with kept_as_it_was(roots, backend.unet), loads_of_loaded_models_skipped(self._loader()):
                replaced = make_ordinary(roots)
                if replaced:
                    log.info("adapters training: %d of Forge's inference tensors made ordinary for gradients", replaced)
                yield
        finally:
            _restore_hypernetworks(hypernetworks)
            model.forge_objects = current

    def refresh_networks(self, method: str = "lora") -> None:
        super().refresh_networks(method)
        if Method(method) is not Method.LORA:
            return
        networks = _lora_extension()
        cached = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        from modules import shared
        if shared.sd_model is not None and hasattr(shared.sd_model, "current_lora_hash"):
            shared.sd_model.current_lora_hash = RELOAD_LORAS


def training_host() -> TrainingHost:
    """The host the WebUI runs in: ``ForgeTrainingHost`` on Forge, ``TrainingHost`` on A1111."""
    from ..host import current
    found = current()
    return ForgeTrainingHost(found) if found.is_forge else TrainingHost()

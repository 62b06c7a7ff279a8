"""What a training run meets on Forge, over the Forge stub (``webui.ForgeStub``): the text encoder, VAE and
loader objects, and the ways Forge's weights and entry points differ from A1111's.

Written from Forge main at dfdcbab6 (``backend/loader.py``, ``backend/operations.py``, ``backend/patcher/
{clip,vae}.py``, ``backend/nn/vae.py``, ``backend/diffusion_engine/{sd15,sdxl}.py``, ``backend/memory_management.py``)
and Forge Classic at 1f95d717 (``modules_forge/forge_loader.py``, ``modules_forge/forge_clip.py``,
``ldm_patched/modules/{sd,model_patcher,model_management}.py``), AGPL code that is not copied here.
``install(stub)`` adds, and ``uninstall()`` takes back:

- **inference tensors**: every weight and buffer of the UNet, VAE and text encoder becomes an inference tensor
  (main's ``forge_loader`` builds the models under ``torch.inference_mode()``; on both the generation runs
  under it, and moving a model to the GPU there makes its weights inference tensors), and
  ``process_images_inner`` runs under ``torch.inference_mode()`` as Forge's does. A naive backward through
  the UNet fails as on the real thing;
- **main's Linear**: as the base stub does for the UNet, every ``nn.Linear`` of the text encoders becomes main's
  ``ForgeOperations.Linear`` (``unet.OperationsLinear``, not an ``nn.Linear``, the same Parameters);
- **the UNet module's own forward is Forge's** (``unet.unet_forward``: ``(x, timesteps, context, y, control,
  transformer_options)``, blocks walked as layers with the patch points), as a UNet Forge built has, and each
  spatial transformer is called as a module with ``(x, context, transformer_options)``, as both Forges call it
  (the base stub runs it as a function), so hooks, wrappers and checkpointing of that layer take effect;
- ``forge_objects.clip`` (``cond_stage_model`` with ``clip_l.transformer`` / SDXL ``clip_g``, a ``patcher``
  over it, ``clone``, ``add_patches``) and ``forge_objects.vae`` (``first_stage_model``, a ``patcher``,
  ``encode`` of ``[B, H, W, 3]`` in [0, 1] that *samples* the posterior as both Forges do, ``decode``);
- main: the engine's ``get_learned_conditioning``/``encode_first_stage``/``decode_first_stage`` under
  ``torch.inference_mode()``, each loading the *current* ``forge_objects``' patcher first; its
  ``text_processing_engine`` (SDXL: ``_l``, ``_g`` and the size ``embedder``); the k-model predictor's
  ``alphas_cumprod`` and ``prediction_type``; ``first_stage_model.process_in/out``;
- Classic: ``encode_first_stage``/``decode_first_stage`` patched as its loader does (inference mode, the
  model's ``latent_format``), ``get_first_stage_encoding`` the identity, the text encoder loading
  ``forge_objects.clip.patcher`` before every encode (``move_clip_to_gpu``), ``current_lora_hash``;
- the loaders ``backend.memory_management`` / ``ldm_patched.modules.model_management`` (``load_models_gpu``,
  ``load_model_gpu``, ``current_loaded_models``; ``stubs_forge.loader``, whose ``ALWAYS_OFFLOAD`` unloads every
  other model on each load as ``--always-offload-from-vram`` does); the CLIP and VAE code above calls them as
  Forge's does.

Not modelled: devices, dtypes other than fp32 (so no manual cast actually happens), tiled VAE, textual inversion.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from modules import processing

from . import unet as forge_unet
from .patcher import CLASSIC, MAIN, ClassicModelPatcher, ModelPatcher
from .webui import ForgeStub


def load_model_gpu(patcher: Any) -> None:
    """What Forge's code calls before using a model: the loader of the flavour on ``sys.path`` (``hosts/*``)."""
    name = "backend.memory_management" if patcher.flavour == MAIN else "ldm_patched.modules.model_management"
    importlib.import_module(name).load_model_gpu(patcher)


class JointTextEncoder(nn.Module):
    """``clip.cond_stage_model``: ``clip_l`` (and SDXL's ``clip_g``), each holding ``transformer``."""


class IntegratedCLIP(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


class ForgeCLIP:
    def __init__(self, cond_stage_model: nn.Module | None, patcher: Any):
        self.cond_stage_model, self.patcher = cond_stage_model, patcher

    def clone(self) -> "ForgeCLIP":
        return ForgeCLIP(self.cond_stage_model, self.patcher.clone())

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class ForgeVAE:
    def __init__(self, first_stage_model: nn.Module, patcher: Any):
        self.first_stage_model, self.patcher = first_stage_model, patcher

    def clone(self) -> "ForgeVAE":
        return ForgeVAE(self.first_stage_model, self.patcher.clone())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` in [0, 1] -> unscaled latents, a *sample* of the posterior (both Forges sample)."""
        load_model_gpu(self.patcher)
        fsm = self.first_stage_model
        moments = fsm.quant_conv(fsm.encoder(pixels.movedim(-1, 1) * 2.0 - 1.0))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape).to(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        load_model_gpu(self.patcher)
        pixels = self.first_stage_model.decode(latents)
        return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


@dataclass
class LatentFormat:
    """``ldm_patched.modules.latent_formats``: SD15 0.18215, SDXL 0.13025."""

    scale_factor: float

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor


@dataclass
class ModelConfig:
    latent_format: LatentFormat


@dataclass
class ForgeTraining:
    stub: ForgeStub
    undo: list = field(default_factory=list)  # callables, run newest first

    # helpers -----------------------------------------------------------------------------------
    def set(self, owner: Any, name: str, value: Any) -> None:
        had, old = name in owner.__dict__, owner.__dict__.get(name)
        owner.__dict__[name] = value
        self.undo.append(lambda: owner.__dict__.__setitem__(name, old) if had else owner.__dict__.pop(name, None))

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()

    # pieces ------------------------------------------------------------------------------------
    def make_inference(self, modules: list[nn.Module]) -> None:
        """Every parameter becomes a ``Parameter`` *created* under ``torch.inference_mode()``, as Forge main's
        ``forge_loader`` (``ForgeOperations.*._load_from_state_dict``: ``torch.nn.Parameter(...)`` under
        inference mode) makes them: such a tensor has no version counter at all, which replacing its ``.data``
        outside inference mode does not give it (the real app showed "Inference tensors do not track version
        counter" where a stub that only swapped ``.data`` in inference mode passed). The Python objects stay
        the same (``torch.utils.swap_tensors``), so the stub's references to them hold."""
        saved = []
        with torch.inference_mode():
            for root in modules:
                for module in root.modules():
                    for param in module._parameters.values():
                        if param is not None and not param.is_inference():
                            created = nn.Parameter(param.data.clone(), requires_grad=param.requires_grad)
                            torch.utils.swap_tensors(param, created)  # param: the inference one; created: the old
                            saved.append(("p", param, created))
                    for name, buffer in list(module._buffers.items()):
                        if buffer is not None:
                            saved.append(("b", (module, name), buffer))
                            module._buffers[name] = buffer.clone()

        def back() -> None:
            for kind, where, value in reversed(saved):
                if kind == "p":
                    torch.utils.swap_tensors(where, value)
                else:
                    where[0]._buffers[where[1]] = value

        self.undo.append(back)

    def operations_linears(self, root: nn.Module) -> None:
        undo = forge_unet.use_operations_linears(root)
        self.undo.append(lambda: forge_unet.restore_linears(undo))


def _inference(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return run


def _text_transformers(tiny: Any) -> dict[str, nn.Module]:
    if tiny.is_sdxl:
        first, second = tiny.conditioner.embedders
        return {"clip_l": first.wrapped.transformer, "clip_g": second.wrapped.transformer}
    return {"clip_l": tiny.cond_stage_model.wrapped.transformer}


def install(stub: ForgeStub) -> ForgeTraining:
    """Add the training side to an installed ``ForgeStub`` (uninstall this first, then the stub)."""
    t = ForgeTraining(stub)
    tiny, flavour, model = stub.tiny, stub.flavour, stub.model
    unet = tiny.model.diffusion_model
    transformers = _text_transformers(tiny)
    if flavour == MAIN:  # main builds its text encoders from ForgeOperations too (the base stub does the UNet)
        for transformer in transformers.values():
            t.operations_linears(transformer)
    t.make_inference([unet, tiny.first_stage_model, *transformers.values()])
    t.set(unet, "forward", lambda *args, **kwargs: forge_unet.unet_forward(unet, *args, **kwargs))
    spatial_transformer = forge_unet.spatial_transformer
    t.set(forge_unet, "spatial_transformer", lambda layer, x, context, to: layer(x, context, to))
    for layer in unet.modules():
        if isinstance(layer, forge_unet.SpatialTransformer):
            t.set(layer, "forward", lambda x, context=None, transformer_options=None, layer=layer: spatial_transformer(
                layer, x, context, {} if transformer_options is None else transformer_options))

    joint = JointTextEncoder()
    for name, transformer in transformers.items():
        setattr(joint, name, IntegratedCLIP(transformer))
    patcher_class = ClassicModelPatcher if flavour == CLASSIC else ModelPatcher
    clip = ForgeCLIP(joint, patcher_class(joint))
    vae = ForgeVAE(tiny.first_stage_model, patcher_class(tiny.first_stage_model))
    for objects in (model.forge_objects, model.forge_objects_original, model.forge_objects_after_applying_lora):
        t.set(objects, "clip", clip)
        t.set(objects, "vae", vae)
    latent = LatentFormat(tiny.scale_factor)
    if flavour == MAIN:
        _install_main(t, model, tiny, latent)
    else:
        _install_classic(t, tiny, latent)
    t.set(processing, "process_images_inner", _inference(processing.process_images_inner))
    return t


def _install_main(t: ForgeTraining, engine: Any, tiny: Any, latent: LatentFormat) -> None:
    predictor = t.stub.predictor  # main's k-model predictor: its schedule and prediction type
    t.set(predictor, "prediction_type", "epsilon")
    predictor.register_buffer("alphas_cumprod", tiny.alphas_cumprod.detach().float().clone(), persistent=False)
    t.undo.append(lambda: predictor._buffers.pop("alphas_cumprod", None))
    fsm = tiny.first_stage_model
    t.set(fsm, "process_in", latent.process_in)
    t.set(fsm, "process_out", latent.process_out)
    if tiny.is_sdxl:
        first, second = tiny.conditioner.embedders
        t.set(engine, "text_processing_engine_l", first)
        t.set(engine, "text_processing_engine_g", second)
        t.set(engine, "embedder", lambda value: forge_unet.timestep_embedding(value, tiny.conditioner.size_embed_dim))
    else:
        t.set(engine, "text_processing_engine", tiny.cond_stage_model)

    def get_learned_conditioning(prompt):
        load_model_gpu(engine.forge_objects.clip.patcher)
        return tiny.get_learned_conditioning(prompt)

    def encode_first_stage(x):
        sample = engine.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return engine.forge_objects.vae.first_stage_model.process_in(sample).to(x)

    def decode_first_stage(x):
        sample = engine.forge_objects.vae.first_stage_model.process_out(x)
        return (engine.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0).to(x)

    for name, fn in (("get_learned_conditioning", get_learned_conditioning),
                     ("encode_first_stage", encode_first_stage), ("decode_first_stage", decode_first_stage)):
        t.set(engine, name, _inference(fn))
    t.set(engine, "get_first_stage_encoding", lambda x: x)


def _install_classic(t: ForgeTraining, tiny: Any, latent: LatentFormat) -> None:
    kmodel = t.stub.base_unet.model
    t.set(kmodel, "model_config", ModelConfig(latent))
    t.set(tiny, "current_lora_hash", str([]))

    def encode_first_stage(x):
        sample = tiny.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return kmodel.model_config.latent_format.process_in(sample).to(x)

    def decode_first_stage(x):
        sample = kmodel.model_config.latent_format.process_out(x)
        return (tiny.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0).to(x)

    t.set(tiny, "encode_first_stage", _inference(encode_first_stage))
    t.set(tiny, "decode_first_stage", _inference(decode_first_stage))
    t.set(tiny, "get_first_stage_encoding", lambda x: x)
    for embedder in [] if tiny.is_sdxl else [tiny.cond_stage_model]:  # forge_clip: CLIP_SD_15_L loads it first
        encode = embedder.encode_with_transformers

        def encode_with_transformers(tokens, encode=encode):
            load_model_gpu(tiny.forge_objects.clip.patcher)
            return encode(tokens)

        t.set(embedder, "encode_with_transformers", encode_with_transformers)


@contextlib.contextmanager
def installed(stub: ForgeStub):
    training = install(stub)
    try:
        yield training
    finally:
        training.uninstall()

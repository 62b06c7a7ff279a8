"""The backend over a model loaded by Stable Diffusion WebUI Forge (main, and Forge Classic): SD1.x/SD2.x/SDXL.

Forge keeps its real models in ``sd_model.forge_objects`` (a UNet patcher, a CLIP with its patcher, a VAE with
its patcher); ``forge_objects_original`` holds the base ones, without the user's LoRAs (Forge merges a LoRA
into the shared weights when it *loads* a patcher that carries it, and the host glue loads the base ones for
the run). What this backend uses, duck-typed (nothing here imports Forge):

* the UNet module ``forge_objects_original.unet.model.diffusion_model``, called directly with Forge's own
  signature ``(x, timesteps, context=, y=, control=, transformer_options=)``. Forge Classic runs each block's
  layers itself, so forward wrappers on a block never fire there: the T2I features go in as a Forge block
  modifier (after the block, before its skip is stored, where the A1111 wrapper adds them) and an IP-Adapter's
  points as the panel's Forge patches (``unet/forge.py``), both on this run's own clone of the base patcher;
* the schedule: Forge main's k-model predictor (``alphas_cumprod``, ``prediction_type``), or Classic's
  A1111-side ``alphas_cumprod``/``parameterization``;
* latents: the VAE's posterior *mean*, computed from ``first_stage_model.encoder``/``quant_conv`` and scaled
  as Forge scales (main: ``first_stage_model.process_in``; Classic: the UNet's ``latent_format``). Forge's own
  ``encode_first_stage`` *samples* the posterior (random, and drawn from the global RNG), which would make the
  latent cache and resumed runs differ; decoding (samples only) is Forge's ``decode_first_stage``;
* prompts: Forge main's text engines (``text_processing_engine`` for SD1/SD2; ``_l``/``_g`` and the size
  ``embedder`` for SDXL, with each sample's own size conditioning), called directly, because main's
  ``get_learned_conditioning`` runs under ``torch.inference_mode()`` and no gradient could reach a text-encoder
  LoRA; on Classic the A1111 objects it keeps (``get_learned_conditioning``, SDXL's ``conditioner``), as
  ``LdmBackend`` does;
* text encoders for LoRA: ``clip.cond_stage_model.clip_l``/``clip_h``/``clip_g`` ``.transformer`` (transformers
  layer names on both Forges, so SDXL's second encoder trains too: ``lora_te2``).

Forge builds (main) or moves (both, onto the GPU inside the generation's ``torch.inference_mode()``) its weights
as inference tensors, which autograd cannot save: the host glue turns them into ordinary tensors before the run
(``webui/training/forge_host.py``); outputs Forge computes under inference mode are cloned here. Forge's
transformer blocks add their residuals in place (``x += n``) after saving ``x`` for backward: the UNet runs
with augmented assignments computed out of place (``augmented.py``), also in a checkpointed block's
recomputation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ...arch import BaseArch, detect_unet_arch
from ...errors import IncompatibleModelError
from ...inference.t2i import fit_feature
from ...unet.forge import ForgeBinding, block_key
from ...unet.layout import bind_layout
from ...unet.points import UNetPoints
from ..latent_cache import CacheIdentity, module_fingerprint
from .augmented import out_of_place_augmented
from .base import (PREDICTION_NAMES, Conditioning, Parameterization, SizeCondition, TextEncoderNaming,
                   TextEncoderPart)
from .ldm import LdmBackend

_ENCODERS = ("clip_l", "clip_h", "clip_g")  # Forge's names in clip.cond_stage_model, in kohya's te1/te2 order


def ordinary(value: Any) -> Any:
    """``value`` (a tensor, or a dict/list of them) with inference tensors replaced by ordinary copies."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: ordinary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(ordinary(v) for v in value)
    return value


def _schedule(sd_model: Any, kmodel: Any, main: bool) -> tuple[Parameterization, torch.Tensor]:
    if main:
        predictor = getattr(kmodel, "predictor", None)
        kind = str(getattr(predictor, "prediction_type", "epsilon"))
        alphas = getattr(predictor, "alphas_cumprod", None)
    else:
        kind = str(getattr(sd_model, "parameterization", "eps"))
        alphas = getattr(sd_model, "alphas_cumprod", None)
    if kind not in PREDICTION_NAMES:
        raise IncompatibleModelError(f"the loaded model predicts {kind!r}; training supports eps- and v-prediction "
                                     "models only")
    if alphas is None:
        raise IncompatibleModelError("Forge's loaded model has no alphas_cumprod schedule; training needs a "
                                     "discrete-time SD1.x, SD2.x or SDXL checkpoint")
    return Parameterization(PREDICTION_NAMES[kind]), alphas.detach().float().cpu().clone()


class ForgeBackend(LdmBackend):
    """See the module docstring. ``sd_model`` is Forge's ``shared.sd_model`` (main's ``ForgeDiffusionEngine`` or
    Classic's A1111 model object); the base objects are read from its ``forge_objects_original``."""

    def __init__(self, sd_model: Any, clip_skip: int | None = None):
        objects = getattr(sd_model, "forge_objects_original", None)
        if objects is None or getattr(objects, "unet", None) is None:
            raise IncompatibleModelError("Forge has no model loaded (sd_model.forge_objects_original.unet is missing); "
                                         "load a Stable Diffusion checkpoint first")
        self.sd_model = sd_model
        self.clip_skip = clip_skip
        self.unet_patcher, self.clip, self.vae = objects.unet, objects.clip, objects.vae
        self._unet = self.unet_patcher.model.diffusion_model
        self.arch = detect_unet_arch(self._unet)
        self.main = hasattr(sd_model, "text_processing_engine") or hasattr(sd_model, "text_processing_engine_l")
        self.is_sgm = self.arch is BaseArch.SDXL and (self.main or hasattr(sd_model, "conditioner"))
        self._parameterization, self._alphas = _schedule(sd_model, self.unet_patcher.model, self.main)
        self.patcher = self.unet_patcher.clone()  # this run's own: the patches apply() runs with
        self._block_modifiers: list = []

    # -- facts --------------------------------------------------------------------------------------
    def text_encoders(self) -> list[TextEncoderPart]:
        joint = getattr(self.clip, "cond_stage_model", None)
        found = [getattr(getattr(joint, name, None), "transformer", None) for name in _ENCODERS]
        found = [t for t in found if isinstance(t, nn.Module) and hasattr(t, "text_model")]
        if len(found) == 1:
            return [TextEncoderPart("lora_te", found[0], TextEncoderNaming.HF_CLIP)]
        return [TextEncoderPart(f"lora_te{i + 1}", t, TextEncoderNaming.HF_CLIP) for i, t in enumerate(found)]

    def base_modules(self) -> list[nn.Module]:
        return [self._unet, self.vae.first_stage_model, self.clip.cond_stage_model]

    def checkpoint_blocks(self) -> list[nn.Module]:
        """Each block's layers: Forge Classic calls those (never the block module), Forge main calls both."""
        unet = self._unet
        return [layer for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks) for layer in block]

    def identity(self) -> CacheIdentity:
        info = self.model_info()
        return CacheIdentity(model=info.sha256 or module_fingerprint(self._unet),
                             vae=module_fingerprint(self.vae.first_stage_model))

    # -- computation --------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae.first_stage_model
        param = next(vae.parameters())
        with torch.no_grad():
            moments = vae.encoder(pixels.to(param.device, param.dtype))
            if getattr(vae, "quant_conv", None) is not None:
                moments = vae.quant_conv(moments)
            mean = moments.chunk(2, dim=1)[0]
            return ordinary(self._process_in(mean)).float()

    def _process_in(self, latent: torch.Tensor) -> torch.Tensor:
        process_in = getattr(self.vae.first_stage_model, "process_in", None)  # Forge main
        if process_in is None:  # Forge Classic: the model's latent format
            config = getattr(self.unet_patcher.model, "model_config", None)
            process_in = getattr(getattr(config, "latent_format", None), "process_in", None)
        if process_in is None:
            raise IncompatibleModelError("Forge's VAE has no latent scaling (first_stage_model.process_in or the "
                                         "model's latent_format); this Forge version is not supported for training")
        return process_in(latent)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.first_stage_model.parameters())
        with torch.no_grad():
            return ordinary(self.sd_model.decode_first_stage(latents.to(param.device, param.dtype))).float()

    def encode_prompts(self, prompts: list[str], sizes: list[SizeCondition] | None = None, *,
                       grad: bool = False) -> Conditioning:
        if not self.main:
            return ordinary(super().encode_prompts(prompts, sizes, grad=grad))
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.no_grad())
            model = self.sd_model
            if not self.is_sgm:
                return ordinary(model.text_processing_engine(list(prompts)))
            cond_l = model.text_processing_engine_l(list(prompts))
            cond_g, pooled = model.text_processing_engine_g(list(prompts))
            sizes = sizes or [SizeCondition((1024, 1024), (0, 0), (1024, 1024))] * len(prompts)
            rows = [(*s.original, *s.crop_top_left, *s.target) for s in sizes]  # (h, w), (top, left), (h, w)
            embed = model.embedder
            vector = torch.stack([torch.cat([embed(torch.tensor([float(v)])) for v in row]).flatten() for row in rows])
            return ordinary({"crossattn": torch.cat([cond_l, cond_g], dim=2),
                             "vector": torch.cat([pooled, vector.to(pooled)], dim=1)})

    def apply(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        y = None
        if isinstance(cond, dict) and "c_crossattn" in cond:
            context = torch.cat(list(cond["c_crossattn"]), 1)
        elif isinstance(cond, dict):
            context, y = cond["crossattn"], cond.get("vector")
        else:
            context = cond
        options = dict(self.patcher.model_options.get("transformer_options", {}))  # per call, as Forge's sampler
        if self._block_modifiers:
            options["block_modifiers"] = [*options.get("block_modifiers", []), *self._block_modifiers]
        extra = {"y": y} if y is not None and getattr(self._unet, "num_classes", None) is not None else {}
        with out_of_place_augmented():  # Forge's residuals are `x += n`, after norm1/norm2 saved x (augmented.py)
            return self._unet(noisy, timesteps, context=context, control=None, transformer_options=options, **extra)

    def checkpoint_context(self):
        """The recomputation of a checkpointed block runs Forge's in-place residuals again: out of place too."""
        return lambda: (out_of_place_augmented(), out_of_place_augmented())

    # -- how contributions reach the UNet ----------------------------------------------------------
    @contextlib.contextmanager
    def t2i_features(self, features: list[torch.Tensor]) -> Iterator[None]:
        levels = {block_key(site.path): level for level, site in enumerate(bind_layout(self._unet).layout.t2i_sites)}

        def add_features(h: torch.Tensor, flag: str, transformer_options: dict) -> torch.Tensor:
            level = levels.get(transformer_options.get("block")) if flag == "after" else None
            return h if level is None else h + fit_feature(features[level], h).to(h.dtype)

        self._block_modifiers.append(add_features)
        try:
            yield
        finally:
            self._block_modifiers.remove(add_features)

    def bind(self, points: UNetPoints) -> "ForgeTrainingBinding":
        return ForgeTrainingBinding(self, points)


class ForgeTrainingBinding:
    """The panel's Forge patches (``unet/forge.py``) on the backend's own patcher for the run, then taken off."""

    def __init__(self, backend: ForgeBackend, points: UNetPoints):
        self.backend = backend
        self.forge = ForgeBinding(points)
        self._previous: Any = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = self.backend.patcher
            self.backend.patcher = self.forge.patch(self._previous)

    def restore(self) -> None:
        if self._previous is not None:
            self.forge.close()
            self.backend.patcher, self._previous = self._previous, None

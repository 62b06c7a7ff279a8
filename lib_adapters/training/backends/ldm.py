"""The backend over a loaded ldm ``LatentDiffusion`` (SD1.x/SD2.x) or sgm ``DiffusionEngine`` (SDXL).

This is the object the WebUI keeps in ``shared.sd_model``; the WebUI glue passes it in, nothing
here imports the WebUI. What is used (host-API notes, section 11):

* ``model.model.diffusion_model``: the UNet; ``model.model`` its wrapper, called directly
  (ldm ``DiffusionWrapper(x, t, c_crossattn=[c])``, sgm ``OpenAIWrapper(x, t, {"crossattn", "vector"})``)
  rather than through ``apply_model``, which the WebUI hijacks to force its own fp16 autocast;
* ``encode_first_stage`` + ``get_first_stage_encoding`` (SD1 returns a posterior: we take its mode);
* ``get_learned_conditioning`` (SD1/2, so prompts are read exactly as at generation time) or, for
  SDXL, the sgm ``conditioner`` with per-image size conditioning;
* ``alphas_cumprod`` and ``parameterization``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...arch import BaseArch, detect_unet_arch
from ...errors import IncompatibleModelError
from ..latent_cache import CacheIdentity, module_fingerprint
from ..lora_names import kohya_unet_name
from .base import (Conditioning, ModelInfo, Parameterization, SizeCondition, TextEncoderNaming, TextEncoderPart,
                   TrainingBackend)


def _text_encoder_part(prefix: str, embedder: nn.Module) -> TextEncoderPart | None:
    """The trainable encoder inside a (WebUI-wrapped) ldm/sgm embedder, or None for size embedders."""
    wrapped = getattr(embedder, "wrapped", embedder)
    transformer = getattr(wrapped, "transformer", None)
    if transformer is not None and hasattr(transformer, "text_model"):
        return TextEncoderPart(prefix, transformer, TextEncoderNaming.HF_CLIP)
    model = getattr(wrapped, "model", None)
    if model is not None and hasattr(getattr(model, "transformer", None), "resblocks"):
        return TextEncoderPart(prefix, model, TextEncoderNaming.OPEN_CLIP)
    return None


class LdmBackend(TrainingBackend):
    def __init__(self, sd_model: nn.Module, clip_skip: int | None = None):
        self.sd_model = sd_model
        self.clip_skip = clip_skip  # the WebUI's "Clip skip" setting, which its text encoder applies (metadata only)
        self._unet = sd_model.model.diffusion_model
        self.arch = detect_unet_arch(self._unet)
        self.is_sgm = hasattr(sd_model, "conditioner") and self.arch is BaseArch.SDXL
        parameterization = str(getattr(sd_model, "parameterization", "eps"))
        if parameterization not in ("eps", "v"):
            raise IncompatibleModelError(
                f"the loaded model predicts {parameterization!r}; training supports eps- and v-prediction models only")
        self._parameterization = Parameterization(parameterization)
        self._alphas = sd_model.alphas_cumprod.detach().float().cpu()

    # -- facts --------------------------------------------------------------------------------------
    def text_encoders(self) -> list[TextEncoderPart]:
        if not self.is_sgm:
            part = _text_encoder_part("lora_te", self.sd_model.cond_stage_model)
            return [part] if part is not None else []
        parts = [p for p in (_text_encoder_part("", e) for e in self.sd_model.conditioner.embedders) if p is not None]
        return [TextEncoderPart(f"lora_te{i + 1}", p.module, p.naming) for i, p in enumerate(parts)]

    def kohya_unet_name(self, path: str) -> str:
        return kohya_unet_name(path, self._unet, self.arch)

    def base_modules(self) -> list[nn.Module]:
        text = self.sd_model.conditioner if self.is_sgm else self.sd_model.cond_stage_model
        return [self._unet, self.sd_model.first_stage_model, text]

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self._unet.input_blocks, self._unet.middle_block, *self._unet.output_blocks]

    def identity(self) -> CacheIdentity:
        info = self.model_info()
        return CacheIdentity(model=info.sha256 or module_fingerprint(self._unet),
                             vae=module_fingerprint(self.sd_model.first_stage_model))

    def model_info(self) -> ModelInfo:
        checkpoint = getattr(self.sd_model, "sd_checkpoint_info", None)
        name = getattr(checkpoint, "filename", None) or getattr(self.sd_model, "sd_model_checkpoint", None) or "unknown"
        sha256 = getattr(checkpoint, "sha256", None)
        legacy = getattr(checkpoint, "hash", None)  # the WebUI's CheckpointInfo.hash: model_hash(filename)
        return ModelInfo(self.arch, self._parameterization, str(name).replace("\\", "/").rsplit("/", 1)[-1], sha256,
                         legacy if legacy not in (None, "", "NOFILE") else None,
                         self.clip_skip if self.clip_skip and self.clip_skip > 1 else None)

    # -- computation --------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.sd_model.first_stage_model
        param = next(vae.parameters())
        with torch.no_grad():
            encoded = self.sd_model.encode_first_stage(pixels.to(param.device, param.dtype))
            if not torch.is_tensor(encoded) and hasattr(encoded, "mode"):  # ldm posterior: take its mean, so latents (and the cache) are deterministic
                encoded = encoded.mode()
            return self.sd_model.get_first_stage_encoding(encoded).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.sd_model.first_stage_model.parameters())
        with torch.no_grad():
            return self.sd_model.decode_first_stage(latents.to(param.device, param.dtype)).float()

    def encode_prompts(self, prompts: list[str], sizes: list[SizeCondition] | None = None, *,
                       grad: bool = False) -> Conditioning:
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.no_grad())
            if not self.is_sgm:
                return self.sd_model.get_learned_conditioning(list(prompts))
            stack.enter_context(_trainable_embedders(self.sd_model.conditioner, grad))
            return self.sd_model.conditioner(self._sdxl_batch(prompts, sizes))

    def _sdxl_batch(self, prompts: list[str], sizes: list[SizeCondition] | None) -> dict:
        n = len(prompts)
        if sizes is None:  # the WebUI's defaults for a square 1024 image without crop
            sizes = [SizeCondition((1024, 1024), (0, 0), (1024, 1024))] * n

        def column(get) -> torch.Tensor:
            return torch.tensor([list(get(s)) for s in sizes], dtype=torch.float32, device=self.device)

        return {"txt": list(prompts), "original_size_as_tuple": column(lambda s: s.original),
                "crop_coords_top_left": column(lambda s: s.crop_top_left),
                "target_size_as_tuple": column(lambda s: s.target)}

    def apply(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        wrapper = self.sd_model.model
        if self.is_sgm:
            return wrapper(noisy, timesteps, cond)
        if isinstance(cond, dict):  # an ldm cond dict ({"c_crossattn": [...]}), as get_learned_conditioning never returns
            return wrapper(noisy, timesteps, **cond)
        return wrapper(noisy, timesteps, c_crossattn=[cond])


@contextlib.contextmanager
def _trainable_embedders(conditioner: nn.Module, grad: bool):
    """sgm's GeneralConditioner runs embedders with ``is_trainable=False`` under no_grad; lift that while training
    the text encoders, and keep classifier-free dropout (``ucg_rate``) at 0 as the WebUI does."""
    saved = []
    for embedder in getattr(conditioner, "embedders", []):
        saved.append((embedder, getattr(embedder, "is_trainable", None), getattr(embedder, "ucg_rate", None)))
        if grad and hasattr(embedder, "is_trainable"):
            embedder.is_trainable = True
        if hasattr(embedder, "ucg_rate"):
            embedder.ucg_rate = 0.0
    try:
        yield
    finally:
        for embedder, trainable, ucg in saved:
            if trainable is not None:
                embedder.is_trainable = trainable
            if ucg is not None:
                embedder.ucg_rate = ucg

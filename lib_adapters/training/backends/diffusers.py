"""The backend over diffusers components, for headless runs: ``UNet2DConditionModel``, ``AutoencoderKL`` and
transformers CLIP text encoders with their tokenizers, all passed in (nothing is downloaded or imported here).

SD1.x/SD2.x: one encoder, its last hidden state. SDXL (two encoders): both penultimate hidden states
concatenated, the second encoder's projected pooled output and ``time_ids`` = original size, crop
top-left, target size, as diffusers' SDXL pipelines build them. LoRA names follow kohya: diffusers
paths for SD1/SD2, sgm paths for SDXL, so the files equal what the ldm backend writes.
"""
from __future__ import annotations

import torch
from torch import nn

from ...arch import BaseArch
from ...errors import IncompatibleModelError
from ..latent_cache import CacheIdentity, module_fingerprint
from ..lora_names import diffusers_to_ldm_path, kohya_name
from .base import (Conditioning, ModelInfo, Parameterization, SizeCondition, TextEncoderNaming, TextEncoderPart,
                   TrainingBackend)


class DiffusersBackend(TrainingBackend):
    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module], tokenizers: list,
                 alphas_cumprod: torch.Tensor, parameterization: str = "eps", *, arch: BaseArch | None = None,
                 name: str = "diffusers", sha256: str | None = None, legacy_hash: str | None = None):
        if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
            raise IncompatibleModelError("the diffusers backend needs one (SD1/SD2) or two (SDXL) text encoders, "
                                         "each with its tokenizer")
        if parameterization not in ("eps", "v"):
            raise IncompatibleModelError(f"prediction type {parameterization!r} is not supported; use eps or v")
        self._unet, self.vae = unet, vae
        self.encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self._alphas = alphas_cumprod.detach().float().cpu()
        self._parameterization = Parameterization(parameterization)
        self.arch = arch or (BaseArch.SDXL if len(text_encoders) == 2 else
                             BaseArch.SD2 if unet.config.cross_attention_dim == 1024 else BaseArch.SD1)
        self.name, self.sha256, self.legacy_hash = name, sha256, legacy_hash

    def text_encoders(self) -> list[TextEncoderPart]:
        prefixes = ["lora_te"] if len(self.encoders) == 1 else ["lora_te1", "lora_te2"]
        return [TextEncoderPart(p, e, TextEncoderNaming.HF_CLIP) for p, e in zip(prefixes, self.encoders)]

    def kohya_unet_name(self, path: str) -> str:
        if self.arch is BaseArch.SDXL:
            return kohya_name("lora_unet", diffusers_to_ldm_path(path, self._unet))
        return kohya_name("lora_unet", path)

    def base_modules(self) -> list[nn.Module]:
        return [self._unet, self.vae, *self.encoders]

    def checkpoint_blocks(self) -> list[nn.Module]:
        return [*self._unet.down_blocks, self._unet.mid_block, *self._unet.up_blocks]

    def identity(self) -> CacheIdentity:
        return CacheIdentity(model=self.sha256 or module_fingerprint(self._unet), vae=module_fingerprint(self.vae))

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.arch, self._parameterization, self.name, self.sha256, self.legacy_hash)

    # -- computation --------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
            return (posterior.mode() * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        with torch.no_grad():
            return self.vae.decode(latents.to(param.device, param.dtype) / self.vae.config.scaling_factor).sample.float()

    def _tokens(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def encode_prompts(self, prompts: list[str], sizes: list[SizeCondition] | None = None, *,
                       grad: bool = False) -> Conditioning:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.arch is not BaseArch.SDXL:
                return self.encoders[0](self._tokens(self.tokenizers[0], prompts))[0]
            hidden, pooled = [], None
            for encoder, tokenizer in zip(self.encoders, self.tokenizers):
                out = encoder(self._tokens(tokenizer, prompts), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0] if out[0].dim() == 2 else pooled  # text_embeds of the projection model
            sizes = sizes or [SizeCondition((1024, 1024), (0, 0), (1024, 1024))] * len(prompts)
            time_ids = torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in sizes], dtype=torch.float32,
                                    device=self.device)
            return {"crossattn": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    def apply(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if not isinstance(cond, dict):
            return self._unet(noisy, timesteps, encoder_hidden_states=cond).sample
        added = None
        if getattr(self._unet.config, "addition_embed_type", None) == "text_time":
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self._unet(noisy, timesteps, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=added).sample

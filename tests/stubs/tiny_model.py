"""A tiny, random, CPU-fast stand-in for the WebUI's ``shared.sd_model`` (SD1.x or SDXL layout).

``build_tiny_sd_model(arch, seed)`` returns a :class:`TinySDModel` shaped like the object the WebUI
loads (``modules/sd_models.py`` + ``sd_models_xl.py``; host-API research section 11):

* ``model.diffusion_model`` is a genuine ``ldm.modules.diffusionmodules.openaimodel.UNetModel``
  (from ``stable-diffusion-sdkit``): model_channels 32, 2 res blocks, spatial transformers, context 32.
  "sd1": channel_mult (1,2,4,4), attention at ds 1/2/4, 4 heads, conv proj -> 12 input blocks like SD1.x.
  "sdxl": channel_mult (1,2,4), attention at ds 2/4 only, head dim 8, linear proj -> 9 input blocks like
  SDXL. ldm's UNet has no ``adm_in_channels``/"sequential" class embedding, so SDXL's ``y`` (the
  ``vector`` cond) is NOT fed to the UNet. Zero-initialised output layers (``zero_module``) are
  re-initialised randomly so every block influences the output.
* ``model`` wraps it like ldm's ``DiffusionWrapper`` (SD1: ``diffusion_model(x, t, context=cat(c_crossattn))``)
  or sgm's ``OpenAIWrapper`` (SDXL: ``context=c["crossattn"]``).
* Text: tiny random ``transformers.CLIPTextModel`` encoders with a built-in word-hash tokenizer
  (vocab 1000, BOS 998, EOS/pad 999), prompts cut into 75-token chunks of 77 tokens like the WebUI's
  ``FrozenCLIPEmbedderWithCustomWords``. SD1: ``cond_stage_model.wrapped.transformer`` (hidden 32, clip skip
  honoured). SDXL: ``conditioner.embedders`` = [CLIP-L-like (16, penultimate layer), bigG-like (16,
  penultimate + projected pooled)], ``crossattn`` = concat (32), ``vector`` = pooled 16 + 6 size
  embeddings of 8 = 64; ``cond_stage_model is conditioner`` as after the WebUI hijack.
* VAE: genuine ldm ``Encoder``/``Decoder`` (ch 32 because ldm's GroupNorm needs 32 groups, ch_mult
  (1,2,2,2) -> /8, z 4, no attention in the down/up path) in an ``AutoencoderKL``-like module. The
  posterior is created with ``deterministic=True`` (zero variance) so encoding is reproducible.
* Schedule: scaled-linear betas 0.00085..0.012 over 1000 steps, ``alphas_cumprod`` fp32, "eps".
Weights are drawn under ``torch.random.fork_rng`` so building a model never disturbs the global RNG.
VAE and text encoders have ``requires_grad=False`` (ldm freezes them); the UNet keeps torch's default.
"""
from __future__ import annotations

from lib_adapters.tiny import scaled_linear_alphas_cumprod  # noqa: E402  (one schedule for demo and stubs)

import contextlib
import hashlib
import io
import os

import torch
from torch import nn

with contextlib.redirect_stdout(io.StringIO()):  # ldm prints about xformers on import
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.diffusionmodules.util import timestep_embedding
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

# The tokenizer and text encoder are the core's (lib_adapters/tiny_diffusers.py), shared with the headless trainer.
from lib_adapters.tiny_diffusers import (BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE,  # noqa: E402,F401
                                         WordHashTokenizer, tiny_clip_text_model as _clip)

CHUNK_LENGTH = 75


class TinyFrozenCLIPEmbedder(nn.Module):
    """Like ldm/sgm ``FrozenCLIPEmbedder``: ``.transformer`` + ``.tokenizer``; ``layer`` "last"/"hidden"/"penultimate"."""

    def __init__(self, transformer: nn.Module, layer: str = "last"):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = WordHashTokenizer()
        self.layer = layer
        self.max_length = MAX_LENGTH


class TinyCLIPEmbedderWithCustomWords(nn.Module):
    """Like the WebUI's ``FrozenCLIPEmbedderWithCustomWords``: texts -> ``[B, 77*k, hidden]`` (k chunks)."""

    def __init__(self, wrapped: TinyFrozenCLIPEmbedder, return_pooled: bool = False):
        super().__init__()
        self.wrapped = wrapped
        self.tokenizer = wrapped.tokenizer
        self.chunk_length = CHUNK_LENGTH
        self.return_pooled = return_pooled

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode_words(t) for t in texts]

    def get_target_prompt_token_count(self, token_count: int) -> int:
        return max(1, -(-token_count // self.chunk_length)) * self.chunk_length

    def chunks(self, texts: list[str]) -> list[torch.Tensor]:
        """``k`` tensors ``[B, 77]``; every text padded to the batch's chunk count with empty chunks."""
        tokenized = self.tokenize(texts)
        count = max(max(1, -(-len(t) // self.chunk_length)) for t in tokenized)
        out = []
        for i in range(count):
            rows = []
            for tokens in tokenized:
                part = tokens[i * self.chunk_length:(i + 1) * self.chunk_length]
                rows.append([BOS_ID, *part] + [EOS_ID] * (MAX_LENGTH - 1 - len(part)))
            out.append(torch.tensor(rows, device=self.device))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_with_transformers(self, tokens: torch.Tensor):
        from modules import shared
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        text_model = getattr(self.wrapped.transformer, "text_model", None)
        if self.wrapped.layer == "penultimate":
            z = outputs.hidden_states[-2]
        elif shared.opts.CLIP_stop_at_last_layers > 1:
            z = text_model.final_layer_norm(outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers])
        else:
            z = outputs.last_hidden_state
        pooled = getattr(outputs, "text_embeds", None)
        return z, pooled

    def forward(self, texts: list[str]):
        zs, pooled = [], None
        for tokens in self.chunks(list(texts)):
            z, p = self.encode_with_transformers(tokens)
            zs.append(z)
            pooled = p if pooled is None else pooled
        z = torch.hstack(zs)
        return (z, pooled) if self.return_pooled else z

    encode = forward


class TinyConditioner(nn.Module):
    """Like sgm's ``GeneralConditioner`` for SDXL: ``{"txt": [...], sizes...}`` -> ``{"crossattn", "vector"}``."""

    size_embed_dim = 8

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings: list[str] | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):
            batch = {"txt": list(batch)}
        texts = list(batch["txt"])
        z_l = self.embedders[0](texts)
        z_g, pooled = self.embedders[1](texts)
        tokens = max(z_l.shape[1], z_g.shape[1])
        crossattn = torch.cat([_pad_tokens(z_l, tokens), _pad_tokens(z_g, tokens)], dim=2)
        if "txt" in (force_zero_embeddings or []):
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        n = len(texts)
        sizes = [batch.get(k, torch.tensor([[1024.0, 1024.0]]).repeat(n, 1)) if k != "crop_coords_top_left"
                 else batch.get(k, torch.zeros(n, 2)) for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        flat = torch.cat(sizes, dim=1).to(crossattn)
        emb = timestep_embedding(flat.reshape(-1), self.size_embed_dim).reshape(n, -1).to(crossattn)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, emb], dim=1)}


def _pad_tokens(z: torch.Tensor, tokens: int) -> torch.Tensor:
    return z if z.shape[1] == tokens else torch.cat([z, z[:, -1:].repeat(1, tokens - z.shape[1], 1)], dim=1)


class TinyAutoencoderKL(nn.Module):
    """``AutoencoderKL``-like: ``encode(x) -> DiagonalGaussianDistribution``, ``decode(z) -> image``."""

    def __init__(self):
        super().__init__()
        ddconfig = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                        resolution=64, z_channels=4, double_z=True)
        with contextlib.redirect_stdout(io.StringIO()):  # ldm prints shapes while building
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.embed_dim = 4

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)), deterministic=True)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class DiffusionWrapper(nn.Module):
    """ldm ``DiffusionWrapper`` (crossattn): ``diffusion_model(x, t, context=cat(c_crossattn, 1))``."""

    def __init__(self, diffusion_model: UNetModel):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class OpenAIWrapper(nn.Module):
    """sgm ``OpenAIWrapper``: ``diffusion_model(x, timesteps=t, context=c["crossattn"])`` (``y`` left out, see module doc)."""

    def __init__(self, diffusion_model: UNetModel):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c: dict, **kwargs):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), **kwargs)


def _unet(arch: str) -> UNetModel:
    common = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                  use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False, use_checkpoint=False)
    if arch == "sd1":
        unet = UNetModel(attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_heads=4, **common)
    else:
        unet = UNetModel(attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_head_channels=8,
                         use_linear_in_transformer=True, **common)
    for module in unet.modules():  # undo ldm's zero_module() so every layer contributes
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return unet




class TinySDModel(nn.Module):
    """The ``shared.sd_model`` look-alike; see the module docstring for its parts."""

    def __init__(self, arch: str, seed: int):
        super().__init__()
        from modules import sd_models
        self.arch = arch
        is_xl = arch == "sdxl"
        self.model = (OpenAIWrapper if is_xl else DiffusionWrapper)(_unet(arch))
        self.first_stage_model = TinyAutoencoderKL()
        if is_xl:
            self.conditioner = TinyConditioner([
                TinyCLIPEmbedderWithCustomWords(TinyFrozenCLIPEmbedder(_clip(16), layer="penultimate")),
                TinyCLIPEmbedderWithCustomWords(TinyFrozenCLIPEmbedder(_clip(16, projection=16), layer="penultimate"), return_pooled=True),
            ])
            self.cond_stage_model = self.conditioner
        else:
            self.cond_stage_model = TinyCLIPEmbedderWithCustomWords(TinyFrozenCLIPEmbedder(_clip(32)))
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_ssd, self.is_sd3 = not is_xl, False, is_xl, False, False
        self.is_sdxl_inpaint = False
        self.model_type = sd_models.ModelType.SDXL if is_xl else sd_models.ModelType.SD1
        self.latent_channels = 4
        self.lowvram = False
        self.parameterization = "eps"
        self.cond_stage_key = "txt"
        self.scale_factor = 0.13025 if is_xl else 0.18215
        self.num_timesteps = 1000
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())
        self.alphas_cumprod_original = self.alphas_cumprod
        name = f"tiny-{arch}-seed{seed}.safetensors"
        sha256 = hashlib.sha256(name.encode()).hexdigest()
        self.sd_checkpoint_info = sd_models.CheckpointInfo(os.path.join(sd_models.model_path, name), sha256=sha256)
        self.sd_model_checkpoint = self.sd_checkpoint_info.filename
        self.sd_model_hash = self.sd_checkpoint_info.shorthash
        self.used_config = None
        self.cond_stage_model_empty_prompt = None

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield None

    def get_learned_conditioning(self, c):
        if not self.is_sdxl:
            return self.cond_stage_model(list(c))
        width = getattr(c, "width", None) or 1024
        height = getattr(c, "height", None) or 1024
        n = len(c)
        from modules import shared
        crop = torch.tensor([[shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left]], dtype=torch.float32)
        batch = {"txt": list(c), "original_size_as_tuple": torch.tensor([[height, width]]).repeat(n, 1),
                 "crop_coords_top_left": crop.repeat(n, 1), "target_size_as_tuple": torch.tensor([[height, width]]).repeat(n, 1)}
        zero = getattr(c, "is_negative_prompt", False) and all(x == "" for x in c)
        return self.conditioner(batch, force_zero_embeddings=["txt"] if zero else [])

    def apply_model(self, x_noisy, t, cond, return_ids: bool = False):
        if self.is_sdxl:
            return self.model(x_noisy, t, cond)
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    def encode_first_stage(self, x: torch.Tensor):
        posterior = self.first_stage_model.encode(x)
        return self.scale_factor * posterior.sample() if self.is_sdxl else posterior

    def get_first_stage_encoding(self, encoder_posterior):
        if self.is_sdxl:
            return encoder_posterior
        z = encoder_posterior.sample() if isinstance(encoder_posterior, DiagonalGaussianDistribution) else encoder_posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

class TinyLatentDiffusion(TinySDModel):
    """SD1.x flavour (ldm ``LatentDiffusion``): adds ``q_sample``."""

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.alphas_cumprod.to(x_start.device)[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x_start + (1 - a).sqrt() * noise


class TinyDiffusionEngine(TinySDModel):
    """SDXL flavour (sgm ``DiffusionEngine``): no ``q_sample``/``p_losses``, dict conditioning."""


def build_tiny_sd_model(arch: str = "sd1", seed: int = 0) -> TinySDModel:
    """Build the tiny model for ``arch`` ("sd1" or "sdxl") with weights drawn from ``seed``; CPU fp32, eval mode."""
    if arch not in ("sd1", "sdxl"):
        raise ValueError(f"unknown tiny architecture {arch!r}; expected 'sd1' or 'sdxl'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (TinyDiffusionEngine if arch == "sdxl" else TinyLatentDiffusion)(arch, seed)
    model.eval()
    for frozen in (model.first_stage_model, model.cond_stage_model):  # as ldm freezes them; the UNet stays trainable
        frozen.requires_grad_(False)
    with torch.no_grad():
        model.cond_stage_model_empty_prompt = _empty_cond(model)
    return model


def _empty_cond(model: TinySDModel) -> torch.Tensor:
    from modules import prompt_parser
    d = model.get_learned_conditioning(prompt_parser.SdConditioning([""]))
    return d["crossattn"] if isinstance(d, dict) else d

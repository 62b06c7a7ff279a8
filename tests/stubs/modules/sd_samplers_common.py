"""Fake of ``modules/sd_samplers_common.py``: sampler base class, step bookkeeping, VAE helpers.

Kept from v1.10.1: ``InterruptedException`` (a ``BaseException``), ``Sampler.callback_state`` setting
``state.sampling_step`` after each step, ``launch_sampling`` setting ``denoiser.steps/total_steps``
and ``state.sampling_steps`` and returning the last latent when interrupted,
``setup_img2img_steps``, and the full-VAE paths of ``images_tensor_to_samples``/``decode_first_stage``
(approximate VAEs such as TAESD are not available).
"""
from __future__ import annotations

import inspect
from collections import namedtuple

import numpy as np
import torch
from PIL import Image

from modules import devices, shared
from modules.shared import opts, state

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps: int) -> int:
        return steps * 2 if self.options.get("second_order", False) else steps


class InterruptedException(BaseException):
    pass


def setup_img2img_steps(p, steps: int | None = None) -> tuple[int, int]:
    """``(steps, t_enc)``: with explicit ``steps`` (hires pass) or ``img2img_fix_steps`` exactly ``steps``
    denoiser steps are run; otherwise ``int(denoising_strength * steps)`` of the schedule."""
    if opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


approximation_indexes = {"Full": 0, "Approx NN": 1, "Approx cheap": 2, "TAESD": 3}


def samples_to_images_tensor(sample: torch.Tensor, approximation: int | None = None, model=None) -> torch.Tensor:
    """Latents -> RGB in [-1, 1] through the model's VAE."""
    model = model if model is not None else shared.sd_model
    return model.decode_first_stage(sample.to(devices.dtype_vae))


def single_sample_to_image(sample: torch.Tensor, approximation: int | None = None) -> Image.Image:
    x = samples_to_images_tensor(sample.unsqueeze(0), approximation)[0] * 0.5 + 0.5
    x = torch.clamp(x, min=0.0, max=1.0)
    x = 255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)
    return Image.fromarray(x.astype(np.uint8))


def decode_first_stage(model, x: torch.Tensor) -> torch.Tensor:
    return samples_to_images_tensor(x.to(devices.dtype_vae), None, model)


def sample_to_image(samples: torch.Tensor, index: int = 0, approximation: int | None = None) -> Image.Image:
    return single_sample_to_image(samples[index], approximation)


def samples_to_image_grid(samples: torch.Tensor, approximation: int | None = None) -> Image.Image:
    from modules import images
    return images.image_grid([single_sample_to_image(sample, approximation) for sample in samples])


def images_tensor_to_samples(image: torch.Tensor, approximation: int | None = None, model=None) -> torch.Tensor:
    """RGB in [0, 1] -> latents (``get_first_stage_encoding(encode_first_stage(2x-1))``), one image at a time."""
    model = model if model is not None else shared.sd_model
    image = image.to(shared.device, dtype=devices.dtype_vae) * 2 - 1
    if len(image) > 1:
        return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(img.unsqueeze(0)))[0] for img in image])
    return model.get_first_stage_encoding(model.encode_first_stage(image))


def store_latent(decoded: torch.Tensor) -> None:
    state.current_latent = decoded


def is_sampler_using_eta_noise_seed_delta(p) -> bool:
    return False


class Sampler:
    """Base of the samplers: holds the CFG denoiser and the per-run extra args."""

    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params: list[str] = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config: SamplerData | None = None
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float("inf")
        self.s_noise = 1.0
        self.eta_option_field = "eta_ancestral"
        self.eta_infotext_field = "Eta"
        self.eta_default = 1.0
        self.conditioning_key = getattr(shared.sd_model.model, "conditioning_key", "crossattn")
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options: dict = {}

    def callback_state(self, d: dict) -> None:
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps: int, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except RecursionError:
            return self.last_latent
        except InterruptedException:
            return self.last_latent

    def number_of_needed_noises(self, p) -> int:
        return p.steps

    def initialize(self, p) -> dict:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        parameters = inspect.signature(self.func).parameters
        return {name: getattr(p, name) for name in self.extra_params if hasattr(p, name) and name in parameters}

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        raise NotImplementedError()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        raise NotImplementedError()

    def add_infotext(self, p) -> None:
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
        if self.model_wrap_cfg.padded_cond_uncond_v0:
            p.extra_generation_params["Pad conds v0"] = True

"""Part of the fake ``modules/processing.py`` (split for size): txt2img with hires fix, and img2img.

``StableDiffusionProcessingTxt2Img``: hires fix upscales the first-pass latents with a "Latent*"
mode (``torch.nn.functional.interpolate``) or, for "None"/"Lanczos"/"Nearest", decodes, resizes with
PIL and re-encodes; then ``before_hr`` + ``process_before_every_sampling`` and an img2img pass of
``hr_second_pass_steps or steps`` denoiser steps with ``p.is_hr_pass`` True. Returns decoded samples
as the real one does. ``StableDiffusionProcessingImg2Img``: init images resized by ``resize_mode``,
encoded with the VAE; a ``mask`` (PIL, white = repaint) becomes ``p.mask``/``p.nmask`` latents that
the CFG denoiser blends every step, then a final blend (``on_mask_blend``) and an overlay composite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from modules import devices, extra_networks, images, prompt_parser, rng, scripts, sd_models, sd_samplers, shared
from modules.processing import StableDiffusionProcessing, create_random_tensors, decode_latent_batch, opt_f
from modules.sd_samplers_common import images_tensor_to_samples
from modules.shared import opts, state


def txt2img_image_conditioning(sd_model, x, width, height):
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


def create_binary_mask(image: Image.Image, round: bool = True) -> Image.Image:
    """Alpha of an RGBA mask (thresholded at 128 when ``round``), else the L conversion."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda x: 255 if x > 128 else 0) if round else alpha
    return image.convert("L")


def apply_overlay(image: Image.Image, paste_loc, overlay: Image.Image | None):
    if overlay is None:
        return image, image.copy()
    original_denoised_image = image.copy()
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB"), original_denoised_image


def old_hires_fix_first_pass_dimensions(width: int, height: int) -> tuple[int, int]:
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str = None

    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    hr_checkpoint_info: dict = field(default=None, init=False)
    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)
    truncate_x: int = field(default=0, init=False)
    truncate_y: int = field(default=0, init=False)
    applied_old_hires_behavior_to: tuple = field(default=None, init=False)
    latent_scale_mode: dict = field(default=None, init=False)
    hr_c: Any = field(default=None, init=False)
    hr_uc: Any = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)
    all_hr_negative_prompts: list = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: list = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        if self.firstphase_width != 0 or self.firstphase_height != 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.width, self.height
            self.width, self.height = self.firstphase_width, self.firstphase_height
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def calculate_target_resolution(self) -> None:
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)
            return
        self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
        if self.hr_resize_y == 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_x, self.hr_resize_x * self.height // self.width
        elif self.hr_resize_x == 0:
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_y * self.width // self.height, self.hr_resize_y
        else:
            if self.width / self.height < self.hr_resize_x / self.hr_resize_y:
                self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_x, self.hr_resize_x * self.height // self.width
            else:
                self.hr_upscale_to_x, self.hr_upscale_to_y = self.hr_resize_y * self.width // self.height, self.hr_resize_y
            self.truncate_x = (self.hr_upscale_to_x - self.hr_resize_x) // opt_f
            self.truncate_y = (self.hr_upscale_to_y - self.hr_resize_y) // opt_f

    def init(self, all_prompts, all_seeds, all_subseeds):
        if not self.enable_hr:
            return
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        if self.hr_checkpoint_name and self.hr_checkpoint_name != "Use same checkpoint":
            self.hr_checkpoint_info = sd_models.get_closet_checkpoint_match(self.hr_checkpoint_name)
            if self.hr_checkpoint_info is None:
                raise Exception(f"Could not find checkpoint with name {self.hr_checkpoint_name}")
            self.extra_generation_params["Hires checkpoint"] = self.hr_checkpoint_info.short_title
        if self.hr_sampler_name is not None and self.hr_sampler_name != self.sampler_name:
            self.extra_generation_params["Hires sampler"] = self.hr_sampler_name

        def get_hr_prompt(p, index, prompt_text, **kwargs):
            hr_prompt = p.all_hr_prompts[index]
            return hr_prompt if hr_prompt != prompt_text else None

        def get_hr_negative_prompt(p, index, negative_prompt, **kwargs):
            hr_negative_prompt = p.all_hr_negative_prompts[index]
            return hr_negative_prompt if hr_negative_prompt != negative_prompt else None

        self.extra_generation_params["Hires prompt"] = get_hr_prompt
        self.extra_generation_params["Hires negative prompt"] = get_hr_negative_prompt
        self.extra_generation_params["Hires schedule type"] = None
        if self.hr_scheduler is None:
            self.hr_scheduler = self.scheduler
        if self.hr_upscaler is not None:
            self.latent_scale_mode = shared.latent_upscale_modes.get(self.hr_upscaler, None)
        else:
            self.latent_scale_mode = shared.latent_upscale_modes.get(shared.latent_upscale_default_mode, "nearest")
        if self.latent_scale_mode is None and not any(x.name == self.hr_upscaler for x in shared.sd_upscalers):
            raise Exception(f"could not find upscaler named {self.hr_upscaler}")
        self.calculate_target_resolution()
        if not state.processing_has_refined_job_count:
            if state.job_count == -1:
                state.job_count = self.n_iter
            shared.total_tqdm.updateTotal((self.steps + (self.hr_second_pass_steps or self.steps)) * state.job_count)
            state.job_count = state.job_count * 2
            state.processing_has_refined_job_count = True
        if self.hr_second_pass_steps:
            self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
        if self.hr_upscaler is not None:
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        del x
        if not self.enable_hr:
            return samples
        decoded = None
        if self.latent_scale_mode is None:
            decoded = torch.stack(decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)).float()
        with sd_models.SkipWritingToConfig():
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, decoded, seeds, subseeds, subseed_strength, prompts)

    def _upscale(self, samples, decoded_samples, target_width: int, target_height: int):
        """Returns ``(latents, image_conditioning)`` at the hires size."""
        if self.latent_scale_mode is not None:
            samples = torch.nn.functional.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),
                                                      mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])
            return samples, self.txt2img_image_conditioning(samples)
        lowres = torch.clamp((decoded_samples + 1.0) / 2.0, min=0.0, max=1.0)
        batch_images = []
        for x_sample in lowres:
            image = Image.fromarray((255.0 * np.moveaxis(x_sample.cpu().numpy(), 0, 2)).astype(np.uint8))
            image = images.resize_image(0, image, target_width, target_height, upscaler_name=self.hr_upscaler)
            batch_images.append(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))
        decoded = torch.from_numpy(np.array(batch_images)).to(shared.device, dtype=devices.dtype_vae)
        samples = images_tensor_to_samples(decoded, None, self.sd_model)
        return samples, self.img2img_image_conditioning(decoded, samples)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples, image_conditioning = self._upscale(samples, decoded_samples, self.hr_upscale_to_x, self.hr_upscale_to_y)
        shared.state.nextjob()
        samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2,
                          self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]
        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds, subseed_strength=self.subseed_strength)
        noise = self.rng.next()
        if not self.disable_extra_networks:
            with devices.autocast():
                extra_networks.activate(self, self.hr_extra_network_data)
        with devices.autocast():
            self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        decoded = decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)
        self.is_hr_pass = False
        return decoded

    def close(self) -> None:
        super().close()
        self.hr_c = None
        self.hr_uc = None

    def setup_prompts(self) -> None:
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == "":
            self.hr_prompt = self.prompt
        if self.hr_negative_prompt == "":
            self.hr_negative_prompt = self.negative_prompt
        n = self.batch_size * self.n_iter
        self.all_hr_prompts = self.hr_prompt if isinstance(self.hr_prompt, list) else n * [self.hr_prompt]
        self.all_hr_negative_prompts = self.hr_negative_prompt if isinstance(self.hr_negative_prompt, list) else n * [self.hr_negative_prompt]

    def calculate_hr_conds(self) -> None:
        if self.hr_c is not None:
            return
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        hr_negative = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name).total_steps(steps)
        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, hr_negative, self.firstpass_steps,
                                                 [self.cached_hr_uc, self.cached_uc], self.hr_extra_network_data, total_steps)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, hr_prompts, self.firstpass_steps,
                                                [self.cached_hr_c, self.cached_c], self.hr_extra_network_data, total_steps)

    def setup_conds(self) -> None:
        if self.is_hr_pass:
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None
        if self.enable_hr and self.hr_checkpoint_info is None and opts.hires_fix_use_firstpass_conds:
            self.calculate_hr_conds()

    def get_conds(self):
        return (self.hr_c, self.hr_uc) if self.is_hr_pass else super().get_conds()

    def parse_extra_network_prompts(self) -> None:
        super().parse_extra_network_prompts()
        if self.enable_hr:
            lo, hi = self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size
            self.hr_prompts = self.all_hr_prompts[lo:hi]
            self.hr_negative_prompts = self.all_hr_negative_prompts[lo:hi]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = None
    latent_mask: Any = None
    force_task_id: str = None

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor = field(default=None, init=False)
    image_conditioning: torch.Tensor = field(default=None, init=False)
    init_img_hash: str = field(default=None, init=False)
    mask_for_overlay: Any = field(default=None, init=False)
    init_latent: torch.Tensor = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.image_mask = self.mask
        self.mask = None
        self.initial_noise_multiplier = opts.initial_noise_multiplier if self.initial_noise_multiplier is None else self.initial_noise_multiplier

    @property
    def mask_blur(self):
        return self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None

    @mask_blur.setter
    def mask_blur(self, value):
        if isinstance(value, int):
            self.mask_blur_x = value
            self.mask_blur_y = value

    def _prepare_mask(self) -> Image.Image | None:
        if self.image_mask is None:
            return None
        image_mask = create_binary_mask(self.image_mask, round=self.mask_round)
        if self.inpainting_mask_invert:
            image_mask = ImageOps.invert(image_mask)
            self.extra_generation_params["Mask mode"] = "Inpaint not masked"
        if self.mask_blur_x > 0 or self.mask_blur_y > 0:
            image_mask = image_mask.filter(ImageFilter.GaussianBlur(radius=max(self.mask_blur_x, self.mask_blur_y)))
            self.extra_generation_params["Mask blur"] = self.mask_blur
        image_mask = images.resize_image(self.resize_mode, image_mask, self.width, self.height)
        np_mask = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        self.mask_for_overlay = Image.fromarray(np_mask)
        self.overlay_images = []
        return image_mask

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.image_cfg_scale = None
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        image_mask = self._prepare_mask()
        latent_mask = self.latent_mask if self.latent_mask is not None else image_mask
        imgs = []
        for img in self.init_images:
            image = images.flatten(img, opts.img2img_background_color)
            if self.resize_mode != 3:
                image = images.resize_image(self.resize_mode, image, self.width, self.height)
            if image_mask is not None:
                masked = Image.new("RGBa", (image.width, image.height))
                masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.mask_for_overlay.convert("L")))
                self.overlay_images.append(masked.convert("RGBA"))
            imgs.append(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))
        if len(imgs) == 1:
            batch_images = np.expand_dims(imgs[0], axis=0).repeat(self.batch_size, axis=0)
            if self.overlay_images is not None:
                self.overlay_images = self.overlay_images * self.batch_size
        elif len(imgs) <= self.batch_size:
            self.batch_size = len(imgs)
            batch_images = np.array(imgs)
        else:
            raise RuntimeError(f"bad number of images passed: {len(imgs)}; expecting {self.batch_size} or less")
        image = torch.from_numpy(batch_images).to(shared.device, dtype=devices.dtype_vae)
        self.init_latent = images_tensor_to_samples(image, None, self.sd_model)
        if self.resize_mode == 3:
            self.init_latent = torch.nn.functional.interpolate(self.init_latent, size=(self.height // opt_f, self.width // opt_f), mode="bilinear")
        if image_mask is not None:
            self._init_latent_mask(latent_mask, all_seeds)
        self.image_conditioning = self.img2img_image_conditioning(image * 2 - 1, self.init_latent, image_mask, self.mask_round)

    def _init_latent_mask(self, latent_mask: Image.Image, all_seeds) -> None:
        latmask = latent_mask.convert("RGB").resize((self.init_latent.shape[3], self.init_latent.shape[2]))
        latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0)[0] / 255
        if self.mask_round:
            latmask = np.around(latmask)
        latmask = np.tile(latmask[None], (self.init_latent.shape[1], 1, 1))
        self.mask = torch.asarray(1.0 - latmask).to(shared.device).type(devices.dtype)
        self.nmask = torch.asarray(latmask).to(shared.device).type(devices.dtype)
        if self.inpainting_fill == 2:
            noise = create_random_tensors(self.init_latent.shape[1:], all_seeds[0:self.init_latent.shape[0]])
            self.init_latent = self.init_latent * self.mask + noise * self.nmask
            self.extra_generation_params["Masked content"] = "latent noise"
        elif self.inpainting_fill == 3:
            self.init_latent = self.init_latent * self.mask
            self.extra_generation_params["Masked content"] = "latent nothing"

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng.next()
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            blended = samples * self.nmask + self.init_latent * self.mask
            if self.scripts is not None:
                mba = scripts.MaskBlendArgs(samples, self.nmask, self.init_latent, self.mask, blended)
                self.scripts.on_mask_blend(self, mba)
                blended = mba.blended_latent
            samples = blended
        return samples

    def get_token_merging_ratio(self, for_hr: bool = False) -> float:
        return self.token_merging_ratio or opts.token_merging_ratio_img2img or opts.token_merging_ratio


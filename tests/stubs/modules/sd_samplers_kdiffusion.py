"""Fake of ``modules/sd_samplers_kdiffusion.py`` (+ the k-diffusion pieces it relies on).

The eps-model wrapper follows k-diffusion's ``CompVisDenoiser``: ``sigmas = sqrt((1 - a) / a)`` from
``sd_model.alphas_cumprod``, ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_out = -sigma``, timestep from sigma
by interpolating log-sigmas, and ``get_sigmas(n)`` = n timesteps evenly spaced from 999 to 0 plus a
final 0 (the "Automatic" schedule of Euler). The only sampling function is Euler
(``sample_euler``, deterministic); every sampler name runs it. ``sample_img2img`` uses
``sigmas[steps - t_enc - 1:]`` and ``x + noise * sigma_sched[0]`` as v1.10.1 does.
"""
from __future__ import annotations

import inspect

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.script_callbacks import ExtraNoiseParams, extra_noise_callback
from modules.shared import opts


class CompVisDenoiser(torch.nn.Module):
    """eps-prediction wrapper of an ldm-style model (``apply_model(x, t, cond)``, ``alphas_cumprod``)."""

    def __init__(self, model, quantize: bool = False):
        super().__init__()
        self.inner_model = model
        alphas_cumprod = model.alphas_cumprod.to(torch.float32)
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)
        self.quantize = quantize
        self.sigma_data = 1.0

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        if n is None:
            return torch.cat([self.sigmas.flip(0), self.sigmas.new_zeros([1])])
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -sigma, 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def get_eps(self, *args, **kwargs) -> torch.Tensor:
        return self.inner_model.apply_model(*args, **kwargs)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        c_out, c_in = (s[(...,) + (None,) * (input.ndim - 1)] for s in self.get_scalings(sigma))
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma[(...,) + (None,) * (x.ndim - 1)]


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler steps over ``sigmas`` (Karras et al. Algorithm 2 without churn unless ``s_churn``)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + torch.randn_like(x) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


samplers_k_diffusion = [
    ("Euler", "sample_euler", ["k_euler"], {}),
]
sampler_extra_params = {"sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"]}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisDenoiser(shared.sd_model, quantize=opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.extra_params = sampler_extra_params.get(funcname, [])
        self.options = options or {}
        self.func = funcname if callable(funcname) else globals()[funcname]
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps: int) -> torch.Tensor:
        if p.sampler_noise_scheduler_override:
            return p.sampler_noise_scheduler_override(steps).cpu()
        return self.model_wrap.get_sigmas(steps).cpu()

    def _extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning) -> dict:
        return {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond}

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        if opts.img2img_extra_noise > 0:
            p.extra_generation_params["Extra noise"] = opts.img2img_extra_noise
            params = ExtraNoiseParams(noise, x, xi)
            extra_noise_callback(params)
            xi = xi + params.noise * opts.img2img_extra_noise
        extra_params_kwargs = self.initialize(p)
        if "sigmas" in inspect.signature(self.func).parameters:
            extra_params_kwargs["sigmas"] = sigma_sched
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        samples = self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args,
                                                                    disable=False, callback=self.callback_state, **extra_params_kwargs))
        self.add_infotext(p)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        if opts.sgm_noise_multiplier:
            p.extra_generation_params["SGM noise multiplier"] = True
            x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = x * sigmas[0]
        extra_params_kwargs = self.initialize(p)
        if "sigmas" in inspect.signature(self.func).parameters:
            extra_params_kwargs["sigmas"] = sigmas
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args,
                                                                disable=False, callback=self.callback_state, **extra_params_kwargs))
        self.add_infotext(p)
        return samples


samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]

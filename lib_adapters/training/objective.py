"""The diffusion training objective, as small pure functions over a model's own ``alphas_cumprod``.

Forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``. Targets: ``eps``, or for v-prediction
``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0``. Min-SNR-gamma weights (Hang et al. 2023, as kohya and
diffusers apply them): ``min(snr, gamma) / snr`` for eps, ``min(snr, gamma) / (snr + 1)`` for v,
with ``snr = a_t / (1 - a_t)``. Noise offset adds ``offset * N(0, 1)`` per sample and channel.
All random draws come from the generator passed in, so a run is reproducible and resumable.
"""
from __future__ import annotations

import torch

from .backends.base import Parameterization


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(like.device)[timesteps.to(like.device)].float()
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def sample_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, num_timesteps)``."""
    return torch.randint(0, num_timesteps, (n,), generator=generator)


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = _gather(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = _gather(alphas_cumprod, timesteps, latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def training_target(parameterization: Parameterization, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    if parameterization is Parameterization.V:
        return velocity(latents, noise, timesteps, alphas_cumprod)
    return noise


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps.cpu()].double()
    return (a / (1 - a)).float()


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    parameterization: Parameterization) -> torch.Tensor:
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if parameterization is Parameterization.V else clipped / s


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per sample (over C, H, W, in fp32), optionally weighted, averaged over the batch."""
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.dim())))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()

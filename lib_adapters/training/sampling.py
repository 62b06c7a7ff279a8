"""Preview samples during training: a small Euler sampler over any backend, isolated from the run's RNG.

The WebUI glue may pass its own sampler (a real txt2img); this one needs nothing but the backend:
k-diffusion-style Euler steps on the model's own schedule with classifier-free guidance, eps or v.
It draws its noise from its own seeded generator and runs inside ``torch.random.fork_rng``, so
sampling never changes what the training run draws next.

An adapter's samples need its input: the method hands a ``SampleConditioning`` (a T2I-Adapter's
features of one condition image, an IP-Adapter's tokens of one reference image) that the sampler
enters around every UNet call, telling it whether the call is the cond or the uncond half of CFG.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from PIL import Image

from ..errors import InputError, MissingFileError
from .backends.base import Parameterization, SizeCondition, TrainingBackend


class SampleConditioning(Protocol):
    """What a method installs in the UNet while a sample is drawn."""

    description: str  # e.g. "condition a.depth.png", for logs

    def around(self, uncond: bool, rows: int) -> ContextManager[None]:
        """Entered around one UNet call of ``rows`` rows, all cond (``uncond=False``) or all uncond."""


@dataclass(frozen=True)
class SampleRequest:
    prompts: tuple[str, ...]
    seed: int
    steps: int
    width: int
    height: int
    cfg_scale: float = 5.0
    negative_prompt: str = ""
    conditioning: SampleConditioning | None = None  # None: the model alone (LoRA runs)


Sampler = Callable[[TrainingBackend, SampleRequest], list[Image.Image]]


def _sigmas(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer timesteps evenly spaced from the last to 0, their sigmas, and a final sigma of 0."""
    timesteps = torch.linspace(len(alphas_cumprod) - 1, 0, steps).round().long()
    sigmas = ((1 - alphas_cumprod[timesteps]) / alphas_cumprod[timesteps]) ** 0.5
    return timesteps, torch.cat([sigmas.float(), torch.zeros(1)])


def to_images(decoded: torch.Tensor) -> list[Image.Image]:
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def euler_sample_latents(backend: TrainingBackend, request: SampleRequest) -> torch.Tensor:
    """Latents for each prompt (one image per prompt, the same seed for all)."""
    n = len(request.prompts)
    size = SizeCondition((request.height, request.width), (0, 0), (request.height, request.width))
    timesteps, sigmas = _sigmas(backend.alphas_cumprod, request.steps)
    g = torch.Generator().manual_seed(request.seed)
    shape = (1, 4, request.height // 8, request.width // 8)
    x = torch.randn(shape, generator=g).repeat(n, 1, 1, 1) * sigmas[0]
    device = backend.device
    x = x.to(device)
    with torch.no_grad():
        cond = backend.encode_prompts(list(request.prompts), [size] * n)
        uncond = backend.encode_prompts([request.negative_prompt] * n, [size] * n)
        for i in range(request.steps):
            sigma = float(sigmas[i])
            scaled = x / (sigma**2 + 1) ** 0.5
            t = timesteps[i].expand(n).to(device)
            eps_c, eps_u = (_eps(backend, scaled, t, c, sigma, request.conditioning, is_uncond)
                            for c, is_uncond in ((cond, False), (uncond, True)))
            eps = eps_u + request.cfg_scale * (eps_c - eps_u)
            x = x + eps * (float(sigmas[i + 1]) - sigma)
    return x


def _eps(backend: TrainingBackend, scaled: torch.Tensor, t: torch.Tensor, cond, sigma: float,
         conditioning: SampleConditioning | None = None, uncond: bool = False) -> torch.Tensor:
    around = conditioning.around(uncond, len(scaled)) if conditioning is not None else contextlib.nullcontext()
    with around:
        out = backend.apply(scaled, t, cond).float()
    if backend.parameterization is Parameterization.V:  # eps = sqrt(a) v + sqrt(1 - a) x_t with a = 1 / (1 + sigma^2)
        a = 1.0 / (sigma**2 + 1)
        out = a**0.5 * out + (1 - a) ** 0.5 * scaled
    return out


def euler_sampler(backend: TrainingBackend, request: SampleRequest) -> list[Image.Image]:
    """The default ``Sampler``: Euler latents decoded by the backend's VAE, RNG-isolated."""
    devices = [backend.device.index or 0] if backend.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        latents = euler_sample_latents(backend, request)
        return to_images(backend.decode_latents(latents))


def check_sample_image(path: Path | None) -> None:
    """A given sample image must open as an image; checked before a run starts, not at its first sample."""
    if path is None:
        return
    if not Path(path).is_file():
        raise MissingFileError(f"the sample image {path} does not exist; give an image file (a condition image for "
                               "a T2I-Adapter, a reference image for an IP-Adapter) or leave it empty to use the "
                               "dataset's first")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        raise InputError(f"the sample image {path} is not an image PIL can read ({exc}); give a PNG, JPEG or WebP "
                         "file or leave it empty") from None

"""IP-Adapter training learns: on shapes of random colours under one constant caption (so only the reference
image, here the image itself, says what colour to draw), a short run lowers the held-out denoising loss
(fixed noise and timesteps, the same base model with and without the adapter) by at least 30%.

On this tiny random model the gain is the trained image path's as a whole: the random VAE's latents of
different colours are close, so which reference is given hardly matters here (that the image tokens are
computed exactly as diffusers computes them is shown by the parity test in test_train_ip_files.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from train_helpers import tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.training.buckets import Bucket, load_pixels, place
from lib_adapters.training.config import IPAdapterConfig, TrainConfig
from lib_adapters.training.loop import train
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod
from lib_adapters.training.objective import add_noise

CAPTION = "a shape"


def _shapes(folder: Path, count: int, rng: np.random.Generator, caption: bool) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        getattr(ImageDraw.Draw(image), ("ellipse", "rectangle")[i % 2])((12, 12, 52, 52), fill=color)
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
        if caption:
            (folder / f"{i}.txt").write_text(CAPTION)
    return paths


def _held_out_loss(backend, method: IPAdapterMethod | None, paths: list[Path]) -> float:
    pixels = torch.stack([load_pixels(p, place(64, 64, Bucket(64, 64))) for p in paths])
    latents = backend.encode_images(pixels)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(100, 900, (len(paths),), generator=g)
    noisy = add_noise(latents, noise, t, backend.alphas_cumprod)
    with torch.no_grad():
        cond = backend.encode_prompts([CAPTION] * len(paths))
        if method is None:
            return float((backend.apply(noisy, t, cond) - noise).pow(2).mean())
        with method.tokens_active(method.image_tokens(method.features.get(paths))):
            return float((backend.apply(noisy, t, cond) - noise).pow(2).mean())


def test_a_trained_adapter_lowers_the_held_out_loss(tmp_path):
    rng = np.random.default_rng(0)
    _shapes(tmp_path / "ds", 16, rng, caption=True)
    held_out = _shapes(tmp_path / "held_out", 8, rng, caption=False)
    encoder = save_clip_vision(tiny_clip_vision(), tmp_path / "clip")
    config = TrainConfig(tmp_path / "ds", tmp_path / "out", "ip", method="ip_adapter", resolution=64, steps=150,
                         batch_size=2, learning_rate=2e-2, seed=0, cache_latents=True,
                         ip=IPAdapterConfig(image_encoder=encoder))
    _, backend = tiny("sd1")
    result = train(config, backend)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])

    base = _held_out_loss(backend, None, held_out)
    method = IPAdapterMethod(backend, config.ip)
    method.load_trainable_file(result.output)  # the exported (fp16) file, as the panel would load it
    trained = _held_out_loss(backend, method, held_out)
    method.close()
    assert trained <= 0.7 * base, (base, trained)
    assert _held_out_loss(backend, None, held_out) == base  # the base model is as it was

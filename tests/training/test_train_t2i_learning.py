"""T2I-Adapter training learns to use the condition: under one constant caption ("a shape"), each image is a square
of a random colour at a random place on a background of the complementary colour, and only the condition image says
which colour and where (a colour-map condition, as TencentARC's ``color`` adapter: the image at the latent grid's
8 px cells, here the image itself since the square lies on that grid). A short run lowers the held-out denoising
loss (held-out images, fixed noise and timesteps) by at least 30% against the same base model without the adapter,
and the same adapter given another held-out image's condition is clearly worse than given the right one: the gain
comes from what the condition shows, not from the added features alone. The base model is left as it was.

The tiny random model needs the stand-ins of ``train_helpers.tiny_pooled``: latents that are the image's 8x8
average pool (the random VAE maps all colours to nearly the same latents) and v-prediction, whose target contains
the clean latents, so that features describing the image help even a frozen random UNet, which is no denoiser
(with eps-prediction the base had to be pre-trained as a caption-only denoiser, and the drop stayed below 20%).
The complementary background keeps each latent channel's spatial mean small: the tiny UNet's GroupNorms have one
channel per group and drop a channel's mean, so a flat colour could not reach its output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from train_helpers import held_out_noising, tiny_pooled

from lib_adapters.formats.t2i import load_t2i_adapter
from lib_adapters.training.buckets import Bucket, load_pixels, place
from lib_adapters.training.t2i_data import load_condition
from lib_adapters.training.config import T2IConfig, TrainConfig
from lib_adapters.training.loop import train
from lib_adapters.training.methods.t2i_adapter import inject_features

CAPTION = "a shape"
CONDITION = "color"
SIZE = 32  # the square's side in pixels: 4x4 latent cells at a place on the 8 px grid


def _square(rng: np.random.Generator) -> Image.Image:
    colour = rng.integers(0, 256, 3)
    x, y = (int(v) * 8 for v in rng.integers(0, (64 - SIZE) // 8 + 1, 2))
    image = Image.new("RGB", (64, 64), tuple(255 - int(c) for c in colour))
    ImageDraw.Draw(image).rectangle((x, y, x + SIZE - 1, y + SIZE - 1), fill=tuple(int(c) for c in colour))
    return image


def _samples(folder: Path, rng: np.random.Generator, count: int) -> list[tuple[Path, Path]]:
    """``count`` (image, condition) files, with the caption beside each image."""
    folder.mkdir(parents=True)
    pairs = []
    for i in range(count):
        image = _square(rng)
        pairs.append((folder / f"{i}.png", folder / f"{i}.{CONDITION}.png"))
        for path in pairs[-1]:
            image.save(path)
        (folder / f"{i}.txt").write_text(CAPTION)
    return pairs


def _held_out_losses(backend, adapter, pairs: list[tuple[Path, Path]]) -> tuple[float, float, float]:
    """(base, with the adapter, with the adapter given the next sample's condition) on fixed noise and timesteps."""
    placement = place(64, 64, Bucket(64, 64))
    latents = backend.encode_images(torch.stack([load_pixels(image, placement) for image, _ in pairs]))
    conditions = torch.stack([load_condition(condition, placement, 3) for _, condition in pairs])
    noisy, t, target = held_out_noising(backend, latents)
    with torch.no_grad():
        cond = backend.encode_prompts([CAPTION] * len(pairs))
        losses = [float((backend.apply(noisy, t, cond) - target).pow(2).mean())]
        for c in (conditions, torch.roll(conditions, 1, 0)):
            with inject_features(backend.unet, adapter(c)):
                losses.append(float((backend.apply(noisy, t, cond) - target).pow(2).mean()))
    return losses[0], losses[1], losses[2]


@pytest.mark.slow
def test_a_trained_adapter_uses_the_condition(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    _samples(tmp_path / "ds", rng, 32)
    held_out = _samples(tmp_path / "held_out", rng, 16)
    _, backend = tiny_pooled("sd1", parameterization="v")
    base_state = {k: v.clone() for k, v in backend.unet.state_dict().items()}

    config = TrainConfig(tmp_path / "ds", tmp_path / "out", "shape", method="t2i_adapter", resolution=64, steps=150,
                         batch_size=4, learning_rate=5e-3, seed=0, cache_latents=True,
                         t2i=T2IConfig(condition=CONDITION))
    result = train(config, backend)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert all(torch.equal(v, base_state[k]) for k, v in backend.unet.state_dict().items())  # the base is unchanged

    adapter = load_t2i_adapter(result.output).module  # the exported (fp16) file, as the panel loads it
    base, right, swapped = _held_out_losses(backend, adapter, held_out)
    print(f"held-out loss: base {base:.4f}, right condition {right:.4f}, another sample's condition {swapped:.4f}")
    assert right <= 0.7 * base, (base, right)
    assert right <= 0.8 * swapped, (right, swapped)

"""IP-Adapter training learns to use the reference image: on images of random colours under one constant caption
(so only the reference, here the image itself, says what colour to draw), a short run lowers the held-out
denoising loss (fixed noise and timesteps, held-out images) by at least 30% against the same base model without
the adapter, and the same adapter given another held-out image's reference is clearly worse than given the right
one: the gain comes from what the image shows, not from the extra attention path.

Two stand-ins make the image's content reach the loss on the tiny random model (train_helpers): latents that are
the image's 8x8 average pool (the random VAE maps all colours to nearly the same latents) and a CLIP vision
encoder whose projection reads the colour (the random one's embeddings are dominated by what all images share).
The model predicts v, whose target contains the clean latents (see ``tiny_pooled``). With eps-prediction, even
features that are the colour itself gave the right and the wrong reference the same loss on this frozen UNet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from train_helpers import (colour_images, half_colour_image, held_out_loss, reading_clip_vision, tiny_pooled,
                           trained_ip_method)

from lib_adapters.training.config import IPAdapterConfig, TrainConfig

CAPTION = "a picture"
READ_SCALE = 5.0  # the encoder's image_embeds[:3] read the colour in [-1, 1] times this; the rest read 0


def _colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3))


def _encoder(folder: Path) -> Path:
    """Fitted on its own random colours, none of them a training or held-out one."""
    colours = _colours(np.random.default_rng(99), 256)
    targets = torch.zeros(len(colours), 64)
    targets[:, :3] = torch.tensor(colours / 127.5 - 1) * READ_SCALE
    return reading_clip_vision(folder, [half_colour_image(c) for c in colours], targets)


def test_a_trained_adapter_uses_the_reference_image(tmp_path):
    rng = np.random.default_rng(0)
    colour_images(tmp_path / "ds", _colours(rng, 32), CAPTION)
    held_out = colour_images(tmp_path / "held_out", _colours(rng, 16), None)
    config = TrainConfig(tmp_path / "ds", tmp_path / "out", "ip", method="ip_adapter", resolution=64, steps=150,
                         batch_size=4, learning_rate=1e-2, seed=0, cache_latents=True,
                         ip=IPAdapterConfig(image_encoder=_encoder(tmp_path / "clip")))
    _, backend = tiny_pooled("sd1", parameterization="v")
    base = held_out_loss(backend, held_out, CAPTION)
    method = trained_ip_method(config, backend)
    right = held_out_loss(backend, held_out, CAPTION, method, method.features.get(held_out))
    wrong = held_out_loss(backend, held_out, CAPTION, method,
                          method.features.get(held_out[1:] + held_out[:1]))  # each gets another's image
    method.close()
    print(f"held-out loss: base {base:.4f}, right reference {right:.4f}, wrong reference {wrong:.4f}")
    assert right <= 0.7 * base, (base, right)
    assert right <= 0.8 * wrong, (right, wrong)
    assert held_out_loss(backend, held_out, CAPTION) == base  # the base model is as it was

"""Fake of ``modules/rng.py``: per-image-seed noise (``ImageRNG``).

One ``torch.Generator`` per seed; the first ``next()`` draws each image's initial noise and later
calls continue the same generators, so an image's noise does not depend on the batch it is in.
Variation seeds (``subseed_strength``) are blended with ``slerp``; ``seed_resize_from_*`` is ignored.
Generators live on CPU (= the real "CPU" RNG source and the "GPU" source on a CPU device).
"""
from __future__ import annotations

import torch

from modules import devices


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - val) + high * val
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength: float = 0.0,
                 seed_resize_from_h: int = 0, seed_resize_from_w: int = 0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.generators = [torch.Generator(devices.cpu).manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    def first(self) -> torch.Tensor:
        xs = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength != 0 and i < len(self.subseeds):
                sub = torch.randn(self.shape, generator=torch.Generator(devices.cpu).manual_seed(int(self.subseeds[i])))
                noise = slerp(self.subseed_strength, noise.reshape(1, -1), sub.reshape(1, -1)).reshape(self.shape)
            xs.append(noise)
        return torch.stack(xs).to(devices.device)

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(devices.device)

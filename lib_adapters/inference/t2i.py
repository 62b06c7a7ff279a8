"""T2I-Adapter runtime: a condition image turned into four feature maps, once per resolution.

The condition (the preprocessed map) is fitted to the size being generated (latent size x 8) with
the unit's resize mode, padded at the bottom/right to a multiple of the adapter's PixelUnshuffle
factor, and run through the adapter once; the result is cached by latent size, so the hires pass
recomputes at its own size and sampling steps only read the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IncompatibleModelError
from ..formats.t2i import LoadedT2IAdapter
from ..models.t2i_adapter import SpatialAdapterConfig
from ..preprocess.resize import fit_image
from ..unet.layout import BoundLayout
from .schedule import cond_rows_only, level_scales
from .units import AdapterUnit

LATENT_SCALE = 8  # pixels per latent cell in SD1.x/2.x and SDXL


@dataclass
class T2IUnitRuntime:
    label: str  # e.g. "Adapter 1", for messages
    unit: AdapterUnit
    adapter: LoadedT2IAdapter
    condition: np.ndarray  # HWC uint8: the preprocessed map
    _cache: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    forward_count: int = 0  # adapter evaluations so far (once per resolution)

    @property
    def config(self) -> SpatialAdapterConfig:
        assert isinstance(self.adapter.config, SpatialAdapterConfig)
        return self.adapter.config

    @property
    def scales(self) -> tuple[float, ...]:
        return level_scales(self.unit.weight, self.unit.control_mode)

    @property
    def cond_rows_only(self) -> bool:
        return cond_rows_only(self.unit.control_mode)

    def check_compatible(self, bound: BoundLayout) -> None:
        cfg = self.config
        if cfg.sdxl != bound.arch.is_sdxl:
            kind = "SDXL" if cfg.sdxl else "SD1.x/SD2.x"
            raise IncompatibleModelError(
                f"{self.label}: '{self.adapter.name}' is an {kind} T2I-Adapter but the loaded checkpoint is "
                f"{bound.arch.value}. Pick an adapter made for {bound.arch.value}."
            )
        if tuple(cfg.channels) != bound.t2i_channels:
            raise IncompatibleModelError(
                f"{self.label}: '{self.adapter.name}' produces features of widths {cfg.channels} but this UNet "
                f"expects {bound.t2i_channels}."
            )

    def features(self, latent_hw: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        """fp32 features for this latent size, computed on first use."""
        cached = self._cache.get(latent_hw)
        if cached is None or cached[0].device != device:
            image = self.condition_tensor(latent_hw).to(device)
            module = self.adapter.module.to(device)
            with torch.no_grad():
                cached = [f.float() for f in module(image)]
            self.forward_count += 1
            self._cache[latent_hw] = cached
        return cached

    def condition_tensor(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        height, width = latent_hw[0] * LATENT_SCALE, latent_hw[1] * LATENT_SCALE
        fitted = fit_image(self.condition, width, height, self.unit.resize_mode)
        tensor = torch.from_numpy(np.ascontiguousarray(fitted)).float().div(255.0).permute(2, 0, 1)[None]
        if self.config.image_channels == 1:
            tensor = tensor[:, :1]  # edge/sketch maps: the references feed the first channel
        factor = self.config.unshuffle
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:
            tensor = F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")
        return tensor


@dataclass
class StyleUnitRuntime:
    """Style T2I-Adapter: tokens appended to the text context of every cross-attention, for cond
    rows only (uncond rows get zero tokens, as sd-webui-controlnet does), scaled by the weight."""

    label: str
    tokens: torch.Tensor  # [1, num_tokens, context]
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def context_for(self, rows: int, cond_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        tokens = (self.tokens * self.weight).to(like.device, like.dtype).expand(rows, -1, -1)
        if cond_mask is not None:
            tokens = tokens * cond_mask.to(like.dtype).view(-1, 1, 1)
        return tokens


def fit_feature(feature: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Match a feature map to ``h``'s spatial size: crop the bottom/right padding, else interpolate."""
    fh, fw = feature.shape[-2:]
    hh, hw = h.shape[-2:]
    if (fh, fw) == (hh, hw):
        return feature
    if fh >= hh and fw >= hw and fh - hh <= 1 and fw - hw <= 1:
        return feature[..., :hh, :hw]
    return F.interpolate(feature, size=(hh, hw), mode="nearest")

"""The T2I-Adapter family: a condition image turned into four feature maps, once per resolution.

The condition (the preprocessed map) is fitted to the size being generated (latent size x 8) with
the unit's resize mode, padded at the bottom/right to a multiple of the adapter's PixelUnshuffle
factor, and run through the adapter once; the result is cached by latent size, so the hires pass
recomputes at its own size and sampling steps only read the cache. Each level's feature is added to
``h`` after the T2I site of that level (``Point.RESIDUAL``), scaled per level by the control mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.detect import ModelFamily
from ..formats.t2i import LoadedT2IAdapter
from ..models.t2i_adapter import SpatialAdapterConfig
from ..preprocess.resize import ResizeMode, fit_image
from ..unet.points import Point, UNetCall
from .build import BuildContext, Family
from .runtime import UnitRuntime
from .schedule import cond_rows_only, level_scales
from .units import AdapterUnit, ControlMode

LATENT_SCALE = 8  # pixels per latent cell in SD1.x/2.x and SDXL


@dataclass
class T2IUnitRuntime(UnitRuntime):
    label: str  # e.g. "Adapter 1", for messages
    adapter: LoadedT2IAdapter
    condition: np.ndarray  # HWC uint8: the preprocessed map
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    _cache: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    forward_count: int = 0  # adapter evaluations so far (once per resolution)

    points = frozenset({Point.RESIDUAL})

    @classmethod
    def from_unit(cls, label: str, unit: AdapterUnit, adapter: LoadedT2IAdapter,
                  condition: np.ndarray) -> "T2IUnitRuntime":
        return cls(label, adapter, condition, weight=unit.weight, start=unit.start, end=unit.end,
                   control_mode=unit.control_mode, resize_mode=unit.resize_mode)

    @property
    def config(self) -> SpatialAdapterConfig:
        assert isinstance(self.adapter.config, SpatialAdapterConfig)
        return self.adapter.config

    @property
    def scales(self) -> tuple[float, ...]:
        return level_scales(self.weight, self.control_mode)

    @property
    def cond_rows_only(self) -> bool:
        return cond_rows_only(self.control_mode)

    def residual(self, level: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor | None:
        assert call.latent_hw is not None, "the binding reads the latent size off the UNet's entry"
        feature = fit_feature(self.features(call.latent_hw, h.device)[level], h).to(h.dtype)
        feature = feature * self.scales[level]
        if self.cond_rows_only and call.cond_mask is not None:
            feature = feature * call.cond_mask.view(-1, 1, 1, 1)
        return feature

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
        fitted = fit_image(self.condition, width, height, self.resize_mode)
        tensor = torch.from_numpy(np.ascontiguousarray(fitted)).float().div(255.0).permute(2, 0, 1)[None]
        if self.config.image_channels == 1:
            tensor = tensor[:, :1]  # edge/sketch maps: the references feed the first channel
        factor = self.config.unshuffle
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:
            tensor = F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")
        return tensor

    def release(self) -> None:
        self.adapter.module.to("cpu")


def build(ctx: BuildContext, label: str, unit: AdapterUnit, adapter: LoadedT2IAdapter, file: Path) -> T2IUnitRuntime:
    adapter.check_compatible(ctx.bound, label)
    condition = ctx.inputs.condition(unit, ctx.inputs.source_images(label, unit)[0])
    return T2IUnitRuntime.from_unit(label, unit, adapter, condition)


FAMILY = Family("T2I-Adapter", (ModelFamily.T2I_FULL, ModelFamily.T2I_LIGHT),
                ("model", "preprocessor", "weight", "start", "end", "control_mode", "resize_mode", "resolution",
                 "threshold_a", "threshold_b"), build)


def fit_feature(feature: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Match a feature map to ``h``'s spatial size: crop the bottom/right padding, else interpolate."""
    fh, fw = feature.shape[-2:]
    hh, hw = h.shape[-2:]
    if (fh, fw) == (hh, hw):
        return feature
    if fh >= hh and fw >= hw and fh - hh <= 1 and fw - hw <= 1:
        return feature[..., :hh, :hw]
    return F.interpolate(feature, size=(hh, hw), mode="nearest")

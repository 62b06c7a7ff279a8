"""T2I-Adapter training: an adapter (full or light, SD1.x/2.x or SDXL) learns to steer a frozen UNet from a condition.

Per micro-batch the conditions are fitted exactly as their images were (same bucket, resize and
crop), run through the adapter with gradients, and the four feature maps are added to the UNet's
``h`` at the sites the inference panel uses:

the backend adds them (``TrainingBackend.t2i_features``, ``backends/injection.py``): forward wrappers on
the sites of ldm/sgm UNets, a diffusers UNet's own ``down_intrablock_additional_residuals``, or on Forge
a block modifier, each adding ``inference.t2i.fit_feature(feature, h)`` as a panel unit does.

They live only while ``backend.apply`` runs (``unet_context``), so the base UNet is never
left changed. Files: TencentARC keys by default (our panel, sd-webui-controlnet, ComfyUI), or
diffusers keys (``adapter.*``) with the ``T2IAdapter`` config in the metadata.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ...arch import BaseArch
from ...errors import IncompatibleModelError
from ...formats.reader import read_state_dict
from ...formats.t2i import diffusers_config, t2i_from_state_dict, tencentarc_to_diffusers
from ...models.t2i_adapter import SpatialAdapterConfig, build_adapter
from ...unet.layout import bind_layout
from PIL import Image

from ..backends.base import TrainingBackend
from ..backends.injection import inject_features  # noqa: F401  (its home before the backends chose how)
from ..buckets import Bucket, place
from ..config import T2IConfig, T2IKind, T2ILayout, TimestepSampling, TrainConfig
from ..data import ImageRecord
from ..named_files import load_t2i_start
from ..nonfinite import InputSource, NonFiniteInput, bad_rows, kind, shown, unique, weights_advice
from ..outputs import atomic_write
from ..t2i_data import load_condition, load_t2i_records
from .base import ExportInfo, MethodBase, MethodBatch

_NUM_LEVELS = 4


def cubic_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``t = (1 - u**3) * T`` for ``u ~ U[0, 1)``: mostly high-noise steps (TencentARC's and diffusers' SDXL recipe)."""
    u = torch.rand(n, generator=generator)
    return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def unet_feature_channels(unet: nn.Module) -> tuple[int, ...]:
    """The width of ``h`` at the four injection sites (ldm/sgm layout table, or a diffusers UNet's config)."""
    if hasattr(unet, "input_blocks"):
        return bind_layout(unet).t2i_channels
    widths = tuple(int(c) for c in unet.config.block_out_channels)
    return (widths + (widths[-1],) * _NUM_LEVELS)[:_NUM_LEVELS]  # SDXL: 3 levels + the middle block


def adapter_config(t2i: T2IConfig, arch: BaseArch, channels: tuple[int, ...]) -> SpatialAdapterConfig:
    """The shape of a new adapter for this UNet (the released adapters' shapes at the UNet's widths)."""
    unshuffle = 16 if arch is BaseArch.SDXL else 8
    return SpatialAdapterConfig(kind=t2i.adapter_kind, in_channels=t2i.condition_channels * unshuffle**2, channels=channels,
                                num_res_blocks=t2i.res_blocks, unshuffle=unshuffle, sdxl=arch is BaseArch.SDXL)


def _check_fits(cfg: SpatialAdapterConfig, arch: BaseArch, channels: tuple[int, ...], name: str) -> None:
    if cfg.sdxl != (arch is BaseArch.SDXL):
        kind = "SDXL" if cfg.sdxl else "SD1.x/SD2.x"
        raise IncompatibleModelError(f"{name} is an {kind} T2I-Adapter but the model is {arch.value}; "
                                     f"start from an adapter made for {arch.value}, or from scratch")
    if tuple(cfg.channels) != tuple(channels):
        raise IncompatibleModelError(f"{name} produces features of widths {tuple(cfg.channels)} but this UNet needs "
                                     f"{tuple(channels)}; start from a matching adapter, or from scratch")


class T2IAdapterMethod(MethodBase):
    name = "t2i_adapter"

    def __init__(self, backend: TrainingBackend, config: T2IConfig):
        self.backend, self.config = backend, config
        channels = unet_feature_channels(backend.unet)
        if config.init_from is not None:
            loaded = load_t2i_start(config)  # the checks a request gets before the run starts (named_files.py)
            _check_fits(loaded.config, backend.arch, channels, config.init_from.name)
            self.adapter_config, self.adapter = loaded.config, loaded.module
        else:
            self.adapter_config = adapter_config(config, backend.arch, channels)
            self.adapter = build_adapter(self.adapter_config)
        self.adapter.to(backend.device, torch.float32).train().requires_grad_(True)

    @classmethod
    def from_config(cls, config: TrainConfig, backend: TrainingBackend) -> "T2IAdapterMethod":
        return cls(backend, config.t2i)

    @classmethod
    def load_records(cls, config: TrainConfig) -> list[ImageRecord]:
        return load_t2i_records(config)

    @property
    def trains_text_encoder(self) -> bool:
        return False

    # -- training ------------------------------------------------------------------------------------
    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": list(self.adapter.parameters()), "lr": learning_rate}]

    def sample_timesteps(self, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        if self.config.timesteps is TimestepSampling.CUBIC:
            return cubic_timesteps(n, num_train_timesteps, generator)
        return super().sample_timesteps(n, num_train_timesteps, generator)

    def conditions(self, batch: MethodBatch) -> torch.Tensor:
        channels = self.adapter_config.image_channels
        return torch.stack([load_condition(r.condition, p, channels) for r, p in zip(batch.records, batch.placements)])

    @contextlib.contextmanager
    def unet_context(self, batch: MethodBatch) -> Iterator[None]:
        features = self.adapter(self.conditions(batch).to(batch.device))
        with self.backend.t2i_features(features):
            yield

    def nonfinite_inputs(self, batch: MethodBatch, updated: bool, root: Path | None) -> list[NonFiniteInput]:
        """The adapter's features of this batch's conditions, recomputed (only after a non-finite loss)."""
        with torch.no_grad():
            features = self.adapter(self.conditions(batch).to(batch.device))
        rows = sorted({r for f in features for r in bad_rows(f)})
        if not rows:
            return []
        files = unique(batch.records[r].condition for r in rows)
        what = (f"the T2I-Adapter's features of the condition {', '.join(shown(f, root) for f in files)} are "
                f"{kind(features)}")
        advice = weights_advice(self.adapter.parameters(), updated, self.config.init_from, "t2i_init_from",
                                "the T2I-Adapter")
        return [NonFiniteInput(InputSource.FEATURES, what, advice, files)]

    def sample_conditioning(self, records: list[ImageRecord], image: Path | None,
                            resolution: int) -> "T2ISampleConditioning":
        """Features of one condition image (as is; centre-cropped to the square), on cond and uncond rows alike,
        as the panel's default control mode and diffusers' adapter pipeline apply them."""
        path = Path(image) if image is not None else records[0].condition
        with Image.open(path) as im:
            size = im.size
        square = place(*size, Bucket(resolution, resolution))
        condition = load_condition(path, square, self.adapter_config.image_channels)
        with torch.no_grad():
            features = [f.detach() for f in self.adapter(condition[None].to(self.backend.device))]
        return T2ISampleConditioning(f"condition {path.name}", self.backend, features)

    # -- state and files ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.adapter.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)

    def export(self, path: Path, info: ExportInfo, dtype: torch.dtype | None = None) -> Path:
        dtype = dtype or info.config.save_precision.dtype
        tensors = {k: v.to(dtype).contiguous() for k, v in self.trainable_state().items()}
        if self.config.export_layout is T2ILayout.DIFFUSERS:
            tensors = tencentarc_to_diffusers(tensors, self.adapter_config)
        metadata = t2i_metadata(info, self.config, self.adapter_config)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))

    def load_trainable_file(self, path: Path) -> None:
        """Strict: the file must be an adapter of exactly this shape (either layout)."""
        loaded = t2i_from_state_dict(read_state_dict(path), name=Path(path).name)
        if loaded.config != self.adapter_config:
            raise IncompatibleModelError(f"{Path(path).name} is a {loaded.config} adapter; this run trains "
                                         f"{self.adapter_config}")
        self.load_trainable_state(loaded.module.state_dict())

    def close(self) -> None:
        """Hooks only live inside ``unet_context``; free the adapter's GPU memory for the next generation."""
        self.adapter.requires_grad_(False).to("cpu")


class T2ISampleConditioning:
    def __init__(self, description: str, backend: TrainingBackend, features: list[torch.Tensor]):
        self.description, self.backend, self.features = description, backend, features

    @contextlib.contextmanager
    def around(self, uncond: bool, rows: int) -> Iterator[None]:
        with self.backend.t2i_features([f.expand(rows, *f.shape[1:]) for f in self.features]):
            yield


def t2i_metadata(info: ExportInfo, t2i: T2IConfig, cfg: SpatialAdapterConfig) -> dict[str, str]:
    """What the file says about itself: the adapter's diffusers config (to build ``T2IAdapter``), its condition,
    its base model and how it was trained (``modelspec.*`` as in Stability's model spec)."""
    c, model = info.config, info.model
    return {
        **info.modelspec("t2i-adapter"),
        "t2i_adapter.layout": t2i.export_layout.value,
        "t2i_adapter.diffusers_config": json.dumps(diffusers_config(cfg)),
        "t2i_adapter.condition": t2i.condition,
        "t2i_adapter.preprocessor": t2i.preprocessor or "",
        "t2i_adapter.base_model": model.name,
        "t2i_adapter.base_model_version": model.base_model_version,
        "t2i_adapter.init_from": t2i.init_from.name if t2i.init_from is not None else "",
        "t2i_adapter.steps": str(info.step),
        "t2i_adapter.num_images": str(info.num_images),
        "t2i_adapter.learning_rate": str(c.learning_rate),
        "t2i_adapter.batch_size": str(c.batch_size),
        "t2i_adapter.timesteps": t2i.timesteps.value,
        "t2i_adapter.seed": str(c.seed),
        "t2i_adapter.session_id": info.session_id,  # the run (kept over resumes): who may replace the published file
    }

"""IP-Adapter training (plain and Plus, SD1.x/SD2.x and SDXL, ldm and diffusers UNets): the image projection and
per-attn2 ``to_k_ip``/``to_v_ip``, everything else frozen.

The recipe is the reference's (tencent-ailab ``tutorial_train.py`` / ``tutorial_train_plus.py``):
``to_k_ip``/``to_v_ip`` start as copies of the site's ``to_k``/``to_v``; each sample is trained without
its image (the reference's uncond: zero ``image_embeds``, or the encoder's output for an all-zero input
for Plus), without its caption, or without both, at the configured rates, drawn from the run's seeded
generator so that a resumed run draws the same. Image tokens reach the UNet through the panel's own
``GenerationSession`` and the backend's binding (the attn2 wrapper of ``unet/a1111.py``, or on Forge the
panel's Forge patches, ``unet/forge.py``); only the unit below differs from the
panel's: its keys and values are per batch row and keep their gradients. The UNet is never modified:
``close()`` removes the wrappers, and the CLIP vision encoder is the run's own frozen copy.

The exported file is the reference's flat safetensors layout (``image_proj.*``, ``ip_adapter.{1,3,5,...}``
numbered as diffusers' ``attn_processors``), which our panel, diffusers and sd-webui-controlnet load.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...arch import BaseArch
from ...errors import FormatError, IncompatibleModelError
from ...formats.ip import LoadedIPAdapter
from ...formats.state_dict import load_strict
from ...inference.ip import IPUnitRuntime, fold_key_value
from ...inference.session import GenerationSession
from ...models.ip_adapter import IPAdapterModel, ProjectionConfig
from ...models.resampler import DIM_HEAD
from ...unet.layout import IPSite
from ..backends.base import TrainingBackend
from ..config import IPAdapterConfig, IPProjection, TrainConfig
from ..data import ImageRecord
from ..ip_data import (ImageFeatures, encoder_width, load_json_records, load_training_encoder,
                       reference_encoder)
from ..named_files import load_ip_start
from ..nonfinite import InputSource, NonFiniteInput, bad_rows, kind, shown, unique, weights_advice
from ..outputs import atomic_write
from .base import ExportInfo, MethodBase, MethodBatch
from .ip_sites import ip_layout

log = logging.getLogger(__name__)

_TOKENS = {IPProjection.PLAIN: 4, IPProjection.PLUS: 16}  # fixed by diffusers' and sd-webui-controlnet's loaders


@dataclass
class TrainingIPUnit(IPUnitRuntime):
    """The panel's IP unit with per-row tokens that keep their gradients; inactive (scale 0) between batches."""

    tokens: torch.Tensor | None = None  # [rows, T, context]: this batch's projected image tokens

    def scale_at(self, site: IPSite) -> float:
        return 0.0 if self.tokens is None else 1.0

    def key_value(self, site: IPSite, cond_mask: torch.Tensor | None, like: torch.Tensor, heads: int,
                  out_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tokens is not None and self.tokens.shape[0] == like.shape[0], "one token set per batch row"
        kv = self.adapter.model.site(site.number)
        k, v = fold_key_value(kv.to_k_ip(self.tokens), kv.to_v_ip(self.tokens), heads, out_weight)
        return k.to(like.dtype), v.to(like.dtype)

    def release(self) -> None:  # the panel's release moves the model to the CPU; training keeps it in place
        self.tokens = None


@dataclass(frozen=True)
class Drops:
    """Which parts of one sample the reference's dropout removed."""

    image: bool
    text: bool


def draw_drops(n: int, config: IPAdapterConfig, generator: torch.Generator) -> list[Drops]:
    """One uniform draw per sample, split as the reference does: image only, text only, both, neither."""
    u = torch.rand(n, generator=generator).tolist()
    image_only, text_only = config.image_drop, config.image_drop + config.text_drop
    both = text_only + config.both_drop
    return [Drops(image=x < image_only or text_only <= x < both, text=image_only <= x < both) for x in u]


def _projection_config(config: IPAdapterConfig, clip_dim: int, context_dim: int, sdxl: bool) -> ProjectionConfig:
    kind = config.projection
    if kind is IPProjection.PLAIN:
        return ProjectionConfig(kind, clip_dim=clip_dim, context_dim=context_dim, num_tokens=_TOKENS[config.projection])
    dim = config.resampler_dim or (1280 if sdxl and context_dim == 2048 else context_dim)
    return ProjectionConfig(kind, clip_dim=clip_dim, context_dim=context_dim, num_tokens=_TOKENS[config.projection],
                            resampler_dim=dim, resampler_depth=config.resampler_depth,
                            resampler_heads=max(1, dim // DIM_HEAD))


def new_adapter(projection: ProjectionConfig, sites: tuple[IPSite, ...], bound) -> IPAdapterModel:
    """A fresh adapter: torch's default initialisation for the projection (the reference's), and each site's
    ``to_k_ip``/``to_v_ip`` copied from its ``to_k``/``to_v``."""
    model = IPAdapterModel(projection, {s.number: s.hidden for s in sites})
    with torch.no_grad():
        for site in sites:
            attn = bound.module(site.path)
            kv = model.site(site.number)
            kv.to_k_ip.weight.copy_(attn.to_k.weight.detach().float())
            kv.to_v_ip.weight.copy_(attn.to_v.weight.detach().float())
    return model


class IPAdapterMethod(MethodBase):
    name = "ip_adapter"

    @classmethod
    def from_config(cls, config: TrainConfig, backend: TrainingBackend) -> "IPAdapterMethod":
        cache = config.cache_dir / "clip-features" if config.ip.cache_features else None
        return cls(backend, config.ip, cache)

    @classmethod
    def load_records(cls, config: TrainConfig) -> list[ImageRecord]:
        """A ``.json`` dataset path is the reference's list; a folder is the usual image + caption folder."""
        if config.dataset_dir.suffix.lower() == ".json":
            return load_json_records(config.dataset_dir, config.ip.data_root, config.min_image_size)
        return super().load_records(config)

    def __init__(self, backend: TrainingBackend, config: IPAdapterConfig, feature_cache: Path | None = None):
        self.backend, self.config = backend, config
        self.bound = ip_layout(backend)
        sites = self.bound.ip_sites()
        context_dim = int(self.bound.module(sites[0].path).to_k.in_features)
        # the file to fine-tune, with the checks a request gets before the run starts (named_files.py)
        start = load_ip_start(config) if config.init_from is not None else None
        need = start.encoder_need if start is not None else reference_encoder(config.projection, backend.arch)
        self.encoder = load_training_encoder(config, need)
        self.encoder.model.to(backend.device)
        hidden_states = config.projection is IPProjection.PLUS
        width = encoder_width(self.encoder, hidden_states)
        if start is not None:
            if width != start.projection.clip_dim:
                raise IncompatibleModelError(
                    f"{start.name} needs a {start.encoder_need.description} CLIP vision encoder, but "
                    f"{self.encoder.name} gives width {width}; choose the encoder it was trained with")
            start.check_compatible(self.bound, "IP-Adapter training")
            self.projection, model = start.projection, start.model
        else:
            self.projection = _projection_config(config, width, context_dim, backend.arch is BaseArch.SDXL)
            model = new_adapter(self.projection, sites, self.bound)
        self.model = model.float().to(backend.device).requires_grad_(True).train()
        self.features = ImageFeatures(self.encoder, hidden_states, feature_cache)
        self.init_name = start.name if start is not None else ""
        self._install(sites)
        self._drops: tuple[MethodBatch, list[Drops]] | None = None

    def _install(self, sites: tuple[IPSite, ...]) -> None:
        adapter = LoadedIPAdapter("training", self.model, self.projection, {s.number: s.hidden for s in sites})
        empty = torch.zeros(1, 1, self.projection.context_dim)
        self.unit = TrainingIPUnit("IP-Adapter training", adapter, empty, empty)
        self.binding = self.backend.bind(GenerationSession(self.bound, [self.unit]))
        self.binding.install()

    # -- per batch ------------------------------------------------------------------------------------
    @property
    def trains_text_encoder(self) -> bool:
        return False

    def drops(self, batch: MethodBatch) -> list[Drops]:
        """Drawn once per batch (the loop asks for captions, then for the UNet context, of the same batch)."""
        if self._drops is None or self._drops[0] is not batch:
            self._drops = (batch, draw_drops(batch.total, self.config, batch.generator)[batch.rows])
        return self._drops[1]

    def captions(self, batch: MethodBatch, captions: list[str]) -> list[str]:
        return ["" if d.text else c for d, c in zip(self.drops(batch), captions)]

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Projected tokens [B, T, context] of CLIP features (fp32 parameters; autocast applies if active)."""
        return self.model.image_proj(features.to(self.backend.device))

    @contextlib.contextmanager
    def unet_context(self, batch: MethodBatch) -> Iterator[None]:
        features = self.features.get([r.path for r in batch.records])
        empty = self.features.empty()
        features = torch.stack([empty if d.image else f for d, f in zip(self.drops(batch), features)])
        tokens = self.image_tokens(features)
        self.unit.tokens = tokens
        try:
            yield
        finally:
            if tokens.requires_grad:
                # Gradient checkpointing replays the UNet's blocks during backward, after this context: the tokens
                # must still be there then. Their gradient is complete only after the last replay, so drop them then.
                tokens.register_hook(lambda grad: self._drop_tokens(tokens))
            else:
                self._drop_tokens(tokens)

    def _drop_tokens(self, tokens: torch.Tensor) -> None:
        if self.unit.tokens is tokens:
            self.unit.tokens = None

    def nonfinite_inputs(self, batch: MethodBatch, updated: bool, root: Path | None) -> list[NonFiniteInput]:
        """This batch's CLIP image features and image tokens, recomputed (only after a non-finite loss)."""
        images = [r.path for r in batch.records]
        with torch.no_grad():
            features = self.features.get(images)
            rows = bad_rows(features)
            if rows:
                files = unique(images[r] for r in rows)
                return [NonFiniteInput(
                    InputSource.FEATURES, f"the CLIP image features of {', '.join(shown(f, root) for f in files)} "
                    f"(encoder {self.encoder.name}) are {kind([features])}",
                    "The CLIP vision encoder gives NaN/inf for that image: check the encoder file (ip_image_encoder) "
                    "and the image; the learning rate is not the cause.", files)]
            empty = self.features.empty()
            features = torch.stack([empty if d.image else f for d, f in zip(self.drops(batch), features)])
            tokens = self.image_tokens(features)
        rows = bad_rows(tokens)
        if not rows:
            return []
        files = unique(images[r] for r in rows)
        advice = weights_advice(self.model.parameters(), updated, self.config.init_from, "ip_init_from",
                                "the IP-Adapter")
        return [NonFiniteInput(InputSource.FEATURES, f"the IP-Adapter's image tokens of "
                               f"{', '.join(shown(f, root) for f in files)} are {kind([tokens])}", advice, files)]

    def sample_conditioning(self, records: list[ImageRecord], image: Path | None,
                            resolution: int) -> "IPSampleConditioning":
        """Tokens of one reference image for the cond rows and of "no image" for the uncond rows, as the panel
        (and the reference's pipeline) give them."""
        path = Path(image) if image is not None else records[0].path
        with torch.no_grad():
            features = torch.stack([self.features.get([path])[0], self.features.empty()])
            tokens = self.image_tokens(features).detach()
        return IPSampleConditioning(f"reference {path.name}", self, tokens[:1], tokens[1:])

    @contextlib.contextmanager
    def tokens_active(self, tokens: torch.Tensor) -> Iterator[None]:
        """Run the UNet with given tokens (evaluation and tests)."""
        self.unit.tokens = tokens
        try:
            yield
        finally:
            self.unit.tokens = None

    # -- weights --------------------------------------------------------------------------------------
    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": learning_rate}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_strict(self.model, state, "IP-Adapter training state")

    def export(self, path: Path, info: ExportInfo, dtype: torch.dtype | None = None) -> Path:
        dtype = dtype or info.config.save_precision.dtype
        tensors = {k: v.to(dtype).contiguous() for k, v in self.trainable_state().items()}
        metadata = self._metadata(info)
        return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def _metadata(self, info: ExportInfo) -> dict[str, str]:
        c, p = info.config, self.projection
        settings = {"learning_rate": c.learning_rate, "batch_size": c.batch_size, "resolution": c.resolution,
                    "drops": [self.config.image_drop, self.config.text_drop, self.config.both_drop]}
        return {"format": "pt", "adapter_family": "ip-adapter", "ip_projection": self.config.projection.value,
                "ip_num_tokens": str(p.num_tokens), "clip_vision_encoder": self.encoder.name,
                "clip_vision_input": "hidden_states[-2]" if p.kind.uses_hidden_states else "image_embeds",
                "clip_vision_width": str(p.clip_dim), "base_model": info.model.name,
                "base_model_version": info.model.base_model_version, "output_name": c.output_name,
                "steps": str(info.step), "num_images": str(info.num_images), "fine_tuned_from": self.init_name,
                "training_settings": json.dumps(settings), "training_started_at": str(info.started_at),
                "training_finished_at": str(time.time()), "session_id": info.session_id}

    def load_trainable_file(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise FormatError(f"{path} is not a readable IP-Adapter file ({type(exc).__name__}: {exc})") from exc
        load_strict(self.model, state, str(path))

    def close(self) -> None:
        self.binding.restore()
        self.encoder.model.to("cpu")


class IPSampleConditioning:
    def __init__(self, description: str, method: IPAdapterMethod, image: torch.Tensor, no_image: torch.Tensor):
        self.description, self.method, self.image, self.no_image = description, method, image, no_image

    @contextlib.contextmanager
    def around(self, uncond: bool, rows: int) -> Iterator[None]:
        tokens = self.no_image if uncond else self.image
        with self.method.tokens_active(tokens.expand(rows, *tokens.shape[1:])):
            yield

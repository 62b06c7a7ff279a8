"""From the panel's unit values and the WebUI's processing object to a running session.

Each unit is built on its own: a bad file, a missing image or an incompatible model skips that
unit with a message (in the console and in the image's comments) and the generation goes on.
The controller also turns the CFG denoiser's callback into the row layout the session needs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..catalog import EncoderCatalog, ModelCatalog
from ..arch import cross_attention_dim
from ..errors import AdapterError, IncompatibleModelError, InputError
from ..formats.ip import LoadedIPAdapter
from ..inference.blocks import block_weights
from ..inference.cache import AdapterCache, FileKey
from ..inference.encodings import EncodingCache, ReferenceEncoder
from ..inference.ip import IPUnitRuntime
from ..inference.session import GenerationSession
from ..inference.t2i import StyleUnitRuntime, T2IUnitRuntime
from ..inference.units import AdapterUnit
from ..preprocess.registry import PreprocessorCache, run_preprocessor
from ..preprocess.resize import DEFAULT_MAX_MEGAPIXELS, MEGAPIXEL, to_hwc_uint8
from ..unet.layout import BoundLayout, bind_layout
from . import infotext

log = logging.getLogger("adapters")


def rows_of(cond: Any) -> int:
    """Row count of a conditioning (a tensor, or SDXL's dict of tensors)."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[0])


def region_mask(image: Any, max_pixels: int | None = None) -> torch.Tensor | None:
    """An attention mask image as [H, W] in [0, 1] (white: the image prompt acts there)."""
    if image is None or (isinstance(image, dict) and image.get("image") is None):
        return None
    gray = to_hwc_uint8(image, max_pixels).astype(np.float32).mean(axis=2) / 255.0
    return torch.from_numpy(gray)


@dataclass
class GenerationController:
    """Owned by one Script instance; holds at most one live session."""

    catalog: ModelCatalog
    adapters: AdapterCache
    preprocessors: PreprocessorCache
    annotator_dir: Path
    encoders: EncoderCatalog
    encodings: EncodingCache = field(default_factory=EncodingCache)
    max_image_pixels: int | None = DEFAULT_MAX_MEGAPIXELS * MEGAPIXEL  # condition, reference and mask images
    session: GenerationSession | None = None
    messages: list[str] = field(default_factory=list)

    # generation lifecycle ------------------------------------------------------------------
    def start(self, p: Any, unit_values: Sequence[Any]) -> None:
        self.end()
        self.messages = []
        unet = p.sd_model.model.diffusion_model
        bound: BoundLayout | None = None
        t2i: list[T2IUnitRuntime] = []
        ip: list[IPUnitRuntime] = []
        style: list[StyleUnitRuntime] = []
        for index, value in enumerate(unit_values):
            label = infotext.unit_key(index)
            try:
                unit = AdapterUnit.from_value(value)
                if not unit.is_active:
                    continue
                bound = bound or bind_layout(unet)
                runtime, model_label = self._build_unit(label, unit, p, bound)
            except AdapterError as exc:
                self._skip(p, label, exc)
                continue
            except Exception as exc:  # a bug or an odd file must cost this unit only, never the others
                log.exception("%s failed", label)
                self._skip(p, label, AdapterError(f"unexpected {type(exc).__name__}: {exc}"))
                continue
            is_ip = isinstance(runtime, IPUnitRuntime)
            if is_ip:
                ip.append(runtime)
            elif isinstance(runtime, StyleUnitRuntime):
                style.append(runtime)
            else:
                t2i.append(runtime)
            p.extra_generation_params[label] = infotext.format_unit(unit, model_label, ip=is_ip)
        if t2i or ip or style:
            self.session = GenerationSession(unet, t2i, bound, ip, style)
            self.session.install()

    def end(self) -> None:
        """Restore the UNet and unpin the generation's models; safe to call at any time, any number of times."""
        session, self.session = self.session, None
        try:
            if session is not None:
                session.restore()
        finally:
            self.adapters.release()

    def on_cfg_denoiser(self, params: Any) -> None:
        if self.session is None:
            return
        uncond = rows_of(params.text_uncond)
        cond = int(params.x.shape[0]) - uncond
        denoiser = getattr(params, "denoiser", None)
        step = getattr(denoiser, "step", None)
        total = getattr(denoiser, "total_steps", None)
        if step is None or not total:
            step, total = params.sampling_step, params.total_sampling_steps
        self.session.on_denoiser(cond, uncond, step, total)

    # building units --------------------------------------------------------------------------
    def _build_unit(self, label: str, unit: AdapterUnit, p: Any, bound: BoundLayout
                    ) -> tuple[T2IUnitRuntime | IPUnitRuntime | StyleUnitRuntime, str]:
        path = self.catalog.resolve(unit.model)
        loaded = self.adapters.load_adapter(path)
        if isinstance(loaded, LoadedIPAdapter):
            loaded.check_compatible(bound, label)
            runtime: T2IUnitRuntime | IPUnitRuntime | StyleUnitRuntime = self._ip_runtime(label, unit, loaded, path, p,
                                                                                          bound)
        elif loaded.is_style:
            runtime = self._style_runtime(label, unit, loaded, p, bound)
        else:
            runtime = self._t2i_runtime(label, unit, loaded, p)
            runtime.check_compatible(bound)
        return runtime, f"{path.stem} [{self.catalog.short_hash(path)}]"

    def _t2i_runtime(self, label: str, unit: AdapterUnit, adapter: Any, p: Any) -> T2IUnitRuntime:
        condition = self.preprocess(unit, self._source_images(label, unit, p)[0])
        return T2IUnitRuntime(label, unit, adapter, condition)

    def _style_runtime(self, label: str, unit: AdapterUnit, adapter: Any, p: Any,
                       bound: BoundLayout) -> StyleUnitRuntime:
        """The style adapter reads CLIP ViT-L's last hidden states and yields context tokens."""
        cfg = adapter.config
        context = cross_attention_dim(bound.unet)
        if cfg.context_dim != context:
            raise IncompatibleModelError(
                f"{label}: '{adapter.name}' makes {cfg.context_dim}-wide context tokens but this checkpoint's "
                f"text context is {context} wide; the style adapter is for SD1.x.")
        encoder = self._reference_encoder(self.encoders.find(
            True, cfg.width, f"ViT-L/14 (hidden states of width {cfg.width})"), bound)
        with torch.no_grad():
            hidden = encoder.last_hidden_state(self._source_images(label, unit, p), unit.crop)
            tokens = adapter.module(hidden).mean(dim=0, keepdim=True)
        return StyleUnitRuntime(label, tokens, weight=unit.weight, start=unit.start, end=unit.end)

    def _ip_runtime(self, label: str, unit: AdapterUnit, adapter: LoadedIPAdapter, path: Path, p: Any,
                    bound: BoundLayout) -> IPUnitRuntime:
        """Encode and project the reference images once for the whole job (or not at all when the same images
        went through the same encoder and adapter before); the tokens serve every step and pass."""
        need = adapter.encoder_need
        encoder = self._reference_encoder(self.encoders.find(need.hidden_states, need.width, need.description), bound)
        tokens, empty = encoder.ip_tokens(adapter, FileKey.of(path), self._source_images(label, unit, p), unit.crop,
                                          unit.multi_image)
        return IPUnitRuntime(
            label, adapter, tokens, empty, weight=unit.weight, start=unit.start, end=unit.end,
            block_weights=block_weights(unit.block_preset, bound.arch, unit.composition_weight),
            mask=self._mask(label, unit.mask))

    def _reference_encoder(self, path: Path, bound: BoundLayout) -> ReferenceEncoder:
        device = next(bound.unet.parameters()).device
        return ReferenceEncoder(self.adapters, self.encodings, path, device)

    def preprocess(self, unit: AdapterUnit, image: Any) -> np.ndarray:
        image = to_hwc_uint8(image, self.max_image_pixels)  # the size is checked before anything is decoded
        return run_preprocessor(
            unit.preprocessor, image, resolution=unit.resolution, threshold_a=unit.threshold_a,
            threshold_b=unit.threshold_b, weights_dir=self.annotator_dir, cache=self.preprocessors)

    def _mask(self, label: str, image: Any) -> torch.Tensor | None:
        try:
            return region_mask(image, self.max_image_pixels)
        except InputError as exc:
            raise InputError(f"{label}: attention mask: {exc}") from exc

    def _source_images(self, label: str, unit: AdapterUnit, p: Any) -> list[np.ndarray]:
        images = [i for i in unit.images if not (isinstance(i, dict) and i.get("image") is None)]
        if not images:
            init_images = getattr(p, "init_images", None) or []
            if not init_images:
                raise InputError(f"{label}: no image. Upload an image in the unit "
                                 "(in img2img the input image is used when the unit has none).")
            images = [init_images[0]]
        try:
            return [to_hwc_uint8(image, self.max_image_pixels) for image in images]
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from exc

    def _skip(self, p: Any, label: str, exc: AdapterError) -> None:
        message = f"{label} skipped: {exc}"
        log.warning(message)
        self.messages.append(message)
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(message)
        # API clients see the infotext but not the comments: say it there too
        p.extra_generation_params[f"{label} skipped"] = str(exc)

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

from ..catalog import ModelCatalog
from ..errors import AdapterError, InputError
from ..inference.cache import AdapterCache
from ..inference.session import GenerationSession
from ..inference.t2i import T2IUnitRuntime
from ..inference.units import AdapterUnit
from ..preprocess.registry import PreprocessorCache, run_preprocessor
from ..preprocess.resize import to_hwc_uint8
from ..unet.layout import BoundLayout, bind_layout
from . import infotext

log = logging.getLogger("adapters")


def rows_of(cond: Any) -> int:
    """Row count of a conditioning (a tensor, or SDXL's dict of tensors)."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[0])


@dataclass
class GenerationController:
    """Owned by one Script instance; holds at most one live session."""

    catalog: ModelCatalog
    adapters: AdapterCache
    preprocessors: PreprocessorCache
    annotator_dir: Path
    session: GenerationSession | None = None
    messages: list[str] = field(default_factory=list)

    # generation lifecycle ------------------------------------------------------------------
    def start(self, p: Any, unit_values: Sequence[Any]) -> None:
        self.end()
        self.messages = []
        unet = p.sd_model.model.diffusion_model
        bound: BoundLayout | None = None
        runtimes: list[T2IUnitRuntime] = []
        for index, value in enumerate(unit_values):
            label = infotext.unit_key(index)
            try:
                unit = AdapterUnit.from_value(value)
                if not unit.is_active:
                    continue
                bound = bound or bind_layout(unet)
                runtime, model_label = self._build_runtime(label, unit, p)
                runtime.check_compatible(bound)
            except AdapterError as exc:
                self._skip(p, label, exc)
                continue
            runtimes.append(runtime)
            p.extra_generation_params[label] = infotext.format_unit(unit, model_label)
        if runtimes:
            self.session = GenerationSession(unet, runtimes, bound)
            self.session.install()

    def end(self) -> None:
        """Restore the UNet; safe to call at any time, any number of times."""
        session, self.session = self.session, None
        if session is not None:
            session.restore()

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
    def _build_runtime(self, label: str, unit: AdapterUnit, p: Any) -> tuple[T2IUnitRuntime, str]:
        path = self.catalog.resolve(unit.model)
        adapter = self.adapters.load_t2i(path)
        if adapter.is_style:
            raise AdapterError(f"{label}: style adapters need a CLIP vision encoder, which is not supported yet; "
                               "use a spatial T2I-Adapter (depth, canny, sketch, openpose, seg, color).")
        condition = self.preprocess(unit, self._source_image(label, unit, p))
        model_label = f"{path.stem} [{self.catalog.short_hash(path)}]"
        return T2IUnitRuntime(label, unit, adapter, condition), model_label

    def preprocess(self, unit: AdapterUnit, image: Any) -> np.ndarray:
        return run_preprocessor(
            unit.preprocessor, image, resolution=unit.resolution, threshold_a=unit.threshold_a,
            threshold_b=unit.threshold_b, weights_dir=self.annotator_dir, cache=self.preprocessors)

    @staticmethod
    def _source_image(label: str, unit: AdapterUnit, p: Any) -> np.ndarray:
        image = unit.image
        if isinstance(image, dict) and image.get("image") is None:
            image = None
        if image is None:
            init_images = getattr(p, "init_images", None) or []
            if not init_images:
                raise InputError(f"{label}: no image. Upload a condition image in the unit "
                                 "(in img2img the input image is used when the unit has none).")
            image = init_images[0]
        return to_hwc_uint8(image)

    def _skip(self, p: Any, label: str, exc: AdapterError) -> None:
        message = f"{label} skipped: {exc}"
        log.warning(message)
        self.messages.append(message)
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(message)

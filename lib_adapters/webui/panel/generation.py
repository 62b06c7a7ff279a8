"""From the panel's unit values and the WebUI's processing object to a running session.

Each unit goes through the family registry on its own (``inference/families.py``: file -> family ->
runtime): a bad file, a missing image or an incompatible model skips that unit with a message (in
the console and in the image's comments) and the generation goes on. On A1111 the session's points
are wired into the WebUI's UNet by the A1111 binding (forward wrappers) when the session starts, and
the CFG denoiser's callback gives the session its row layout and progress. On Forge (``host.py``) they
are registered on a clone of Forge's UNet patcher before every sampling pass (``before_sampling``;
the Forge binding reads the rows per UNet call), and the callback gives only the progress.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ...catalog import EncoderCatalog, ModelCatalog
from ...errors import AdapterError
from ...inference.build import BuildContext, UnitInputs
from ...inference.cache import AdapterCache
from ...inference.encodings import EncodingCache
from ...inference.faces import FaceService
from ...inference.families import build_runtime
from ...inference.runtime import UnitRuntime
from ...inference.session import GenerationSession
from ...inference.units import AdapterUnit
from ...preprocess.registry import PreprocessorCache
from ...preprocess.resize import DEFAULT_MAX_MEGAPIXELS, MEGAPIXEL
from ...unet.a1111 import A1111Binding
from ...unet.forge import ForgeBinding
from ...unet.layout import bind_layout
from .. import host as hosts
from . import infotext

log = logging.getLogger("adapters")
_PROMPT_LORA = re.compile(r"<(?:lora|lyco):([^:>]+)", re.IGNORECASE)  # the Lora extension's <lora:name:...>


def prompt_loras(p: Any) -> frozenset[str]:
    """The LoRA names the job's prompts apply themselves (lower case), so a unit does not apply one twice."""
    prompts = [getattr(p, "prompt", "")] + list(getattr(p, "all_prompts", None) or [])
    prompts += list(getattr(p, "all_hr_prompts", None) or [])
    return frozenset(m.strip().lower() for text in prompts if isinstance(text, str) for m in _PROMPT_LORA.findall(text))


def _tell(p: Any, message: str) -> None:
    """Say ``message`` in the console and in the image's comments (the UI shows them under the image)."""
    log.warning(message)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(message)


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
    encoders: EncoderCatalog
    encodings: EncodingCache = field(default_factory=EncodingCache)
    max_image_pixels: int | None = DEFAULT_MAX_MEGAPIXELS * MEGAPIXEL  # condition, reference and mask images
    faces: Optional[FaceService] = None  # face analysis for FaceID units
    lora_dirs: Sequence[Path] = ()  # the WebUI's Lora folders, where a FaceID model's paired LoRA may be
    session: GenerationSession | None = None
    _binding: A1111Binding | None = None
    _forge: ForgeBinding | None = None
    host: hosts.Host | None = None  # None: the detected one

    # generation lifecycle ------------------------------------------------------------------
    def start(self, p: Any, unit_values: Sequence[Any]) -> None:
        self.end()
        host = self.host or hosts.current()
        ctx: BuildContext | None = None
        runtimes: list[UnitRuntime] = []
        for index, value in enumerate(unit_values):
            label = infotext.unit_key(index)
            try:
                unit = AdapterUnit.from_value(value)
                if not unit.is_active:
                    continue
                ctx = ctx or BuildContext(bind_layout(host.unet_module(p)), self.adapters, self.encoders,
                                          self.encodings, self.inputs(getattr(p, "init_images", None) or ()),
                                          self.lora_dirs, prompt_loras(p))
                path = self.catalog.resolve(unit.model)
                built = build_runtime(ctx, label, unit, path)
            except AdapterError as exc:
                self._skip(p, label, exc)
                continue
            except Exception as exc:  # a bug or an odd file must cost this unit only, never the others
                log.exception("%s failed", label)
                self._skip(p, label, AdapterError(f"unexpected {type(exc).__name__}: {exc}"))
                continue
            finally:
                self._say(p, ctx)
            runtimes.append(built.runtime)
            model_label = f"{path.stem} [{self.catalog.short_hash(path)}]"
            p.extra_generation_params[label] = infotext.format_unit(built.written, model_label, built.fields)
        if runtimes:
            assert ctx is not None
            self.session = GenerationSession(ctx.bound, runtimes)
            if host.is_forge:
                self._forge = ForgeBinding(self.session)  # registered in before_sampling, on each pass's patcher
            else:
                self._binding = A1111Binding(self.session)
                self._binding.install()

    def before_sampling(self, p: Any) -> None:
        """Forge, before every sampling pass: the current UNet patcher becomes a clone carrying the session
        (Forge reset ``forge_objects`` just before, so the pass's patcher is the only change; Forge's own
        ControlNet/IP-Adapter clone and set it the same way, so whichever runs later chains onto the other).
        Nothing on A1111, or when no unit is active."""
        binding = self._forge
        if binding is None or not binding.active:
            return
        objects = p.sd_model.forge_objects
        try:
            objects.unet = binding.patch(objects.unet)
        except Exception as exc:  # this pass samples without the units; the image still comes, and says so
            if not isinstance(exc, AdapterError):
                log.exception("Adapters: registering the units on Forge's UNet patcher failed")
                exc = AdapterError(f"unexpected {type(exc).__name__}: {exc}")
            _tell(p, f"Adapters: {exc}")
            p.extra_generation_params["Adapters skipped"] = str(exc)  # API clients read the infotext

    def end(self) -> None:
        """Restore the UNet and unpin the generation's models; safe to call at any time, any number of times."""
        session, binding, self.session, self._binding = self.session, self._binding, None, None
        forge, self._forge = self._forge, None
        try:
            if binding is not None:
                binding.restore()
            if forge is not None:
                forge.close()  # nothing on the model to restore: Forge drops the patched clone at its next reset
        finally:
            try:
                if session is not None:
                    session.close()
            finally:
                self.adapters.release()

    def on_cfg_denoiser(self, params: Any) -> None:
        if self.session is None:
            return
        denoiser = getattr(params, "denoiser", None)
        step = getattr(denoiser, "step", None)
        total = getattr(denoiser, "total_steps", None)
        if step is None or not total:
            step, total = params.sampling_step, params.total_sampling_steps
        if self._forge is not None:  # Forge's params.x holds one row per image; rows are marked per UNet call
            self.session.on_progress(step, total)
            return
        uncond = rows_of(params.text_uncond)
        cond = int(params.x.shape[0]) - uncond
        self.session.on_denoiser(cond, uncond, step, total)

    def inputs(self, init_images: Sequence[Any] = ()) -> UnitInputs:
        """How this panel's units read their images (also the preview's preprocessing)."""
        return UnitInputs(self.preprocessors, self.annotator_dir, self.max_image_pixels, init_images, self.faces)

    @staticmethod
    def _say(p: Any, ctx: BuildContext | None) -> None:
        """The notes of a unit's build (it still runs): in the console and the image's comments."""
        while ctx is not None and ctx.notes:
            _tell(p, ctx.notes.pop(0))

    def _skip(self, p: Any, label: str, exc: AdapterError) -> None:
        reason = str(exc)
        if reason.startswith(f"{label}: "):  # e.g. the face analysis names the unit for the preview's message
            reason = reason[len(label) + 2:]
        _tell(p, f"{label} skipped: {reason}")
        # API clients see the infotext but not the comments: say it there too
        p.extra_generation_params[f"{label} skipped"] = reason

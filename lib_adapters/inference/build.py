"""What an adapter family's builder gets to turn a unit into a runtime, and the registry entry it declares.

``Family`` is one adapter family as the registry (``families.py``) knows it: the file families it
serves (as ``formats/detect.py`` tells them from keys), the unit fields it reads (so its infotext
holds those and no others), and ``build(ctx, label, unit, adapter, file)``, which checks the loaded
file against the UNet once, then encodes or preprocesses what the unit needs and returns its
``UnitRuntime``. A family whose infotext depends on the file (FaceID writes the structure weight of
Plus v2 files only) or resolves a default (the face model pack) says so with ``written``.
``BuildContext`` holds what builders share in one generation: the bound UNet, the model and encoding
caches, the encoder catalog, the unit's images (``UnitInputs``, face analysis included), where LoRA
files are and which LoRAs the prompt applies itself, and the notes for the user that are not errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..catalog import EncoderCatalog
from ..errors import InputError, MissingFileError
from ..formats.detect import ModelFamily
from ..preprocess.registry import PreprocessorCache, run_preprocessor
from ..preprocess.resize import DEFAULT_MAX_MEGAPIXELS, MEGAPIXEL, to_hwc_uint8
from ..unet.layout import BoundLayout
from .cache import AdapterCache
from .encodings import EncodingCache, ReferenceEncoder
from .faces import FaceService
from .runtime import UnitRuntime
from .units import AdapterUnit


@dataclass
class UnitInputs:
    """A unit's images as the builders read them: decoded within the pixel limit, preprocessed, as masks."""

    preprocessors: PreprocessorCache
    annotator_dir: Path
    max_image_pixels: int | None = DEFAULT_MAX_MEGAPIXELS * MEGAPIXEL  # condition, reference and mask images
    init_images: Sequence[Any] = ()  # img2img's input images: a unit without an image of its own uses the first
    faces: Optional[FaceService] = None  # face analysis for FaceID units and the face preview; None: not set up

    def source_images(self, label: str, unit: AdapterUnit) -> list[np.ndarray]:
        images = [i for i in unit.images if not (isinstance(i, dict) and i.get("image") is None)]
        if not images:
            if not self.init_images:
                raise InputError(f"{label}: no image. Upload an image in the unit "
                                 "(in img2img the input image is used when the unit has none).")
            images = [self.init_images[0]]
        try:
            return [to_hwc_uint8(image, self.max_image_pixels) for image in images]
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from exc

    def condition(self, unit: AdapterUnit, image: Any) -> np.ndarray:
        """The unit's preprocessor applied to ``image`` (the size is checked before anything is decoded)."""
        image = to_hwc_uint8(image, self.max_image_pixels)
        finder = None
        if unit.preprocessor == "face":  # the FaceID preview: the unit's face models find the faces
            finder = self.face_service().finder(unit.face_pack, unit.face_index)
        return run_preprocessor(
            unit.preprocessor, image, resolution=unit.resolution, threshold_a=unit.threshold_a,
            threshold_b=unit.threshold_b, weights_dir=self.annotator_dir, cache=self.preprocessors, detector=finder)

    def face_service(self) -> FaceService:
        if self.faces is None:
            raise MissingFileError("face analysis is not set up here (no models folder for the face models); "
                                   "FaceID units run in the WebUI's Adapters panel.")
        return self.faces

    def mask(self, label: str, image: Any) -> torch.Tensor | None:
        """An attention mask image as [H, W] in [0, 1] (white: the image prompt acts there), or None."""
        if image is None or (isinstance(image, dict) and image.get("image") is None):
            return None
        try:
            gray = to_hwc_uint8(image, self.max_image_pixels).astype(np.float32).mean(axis=2) / 255.0
        except InputError as exc:
            raise InputError(f"{label}: attention mask: {exc}") from exc
        return torch.from_numpy(gray)


@dataclass
class BuildContext:
    bound: BoundLayout
    models: AdapterCache
    encoders: EncoderCatalog
    encodings: EncodingCache
    inputs: UnitInputs
    lora_dirs: Sequence[Path] = ()  # the WebUI's Lora folders (a FaceID model's paired LoRA may be there)
    prompt_loras: frozenset[str] = frozenset()  # LoRA names the prompts apply with <lora:...>, lower case
    notes: list[str] = field(default_factory=list)  # "Adapter 1: ..." said to the user, the unit still runs

    def note(self, label: str, message: str) -> None:
        self.notes.append(f"{label}: {message}")

    def reference_encoder(self, path: Path) -> ReferenceEncoder:
        """The CLIP vision encoder file ``path``, used through the caches, on the UNet's device."""
        device = next(self.bound.unet.parameters()).device
        return ReferenceEncoder(self.models, self.encodings, path, device)


Written = Callable[[AdapterUnit, Any, BuildContext], "tuple[tuple[str, ...], AdapterUnit]"]


@dataclass(frozen=True)
class Family:
    name: str  # "T2I-Adapter", for messages
    detected: tuple[ModelFamily, ...]  # the file families whose loaded adapters it builds runtimes for
    unit_fields: tuple[str, ...]  # the AdapterUnit fields it reads, in infotext order ("model" first)
    build: Callable[[BuildContext, str, AdapterUnit, Any, Path], UnitRuntime]
    # what a built unit's infotext holds, when it depends on the file: (its fields of unit_fields, the unit with
    # the defaults it resolved); None: unit_fields and the unit as given
    written: Optional[Written] = None

    def infotext(self, unit: AdapterUnit, adapter: Any, ctx: BuildContext) -> tuple[tuple[str, ...], AdapterUnit]:
        return (self.unit_fields, unit) if self.written is None else self.written(unit, adapter, ctx)

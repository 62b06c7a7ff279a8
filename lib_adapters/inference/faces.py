"""Faces for FaceID units: the analyzers of the user's model packs, and what they find kept between generations.

A face analyzer (``face.FaceAnalyzer``: an SCRFD detector and an ArcFace recognizer in onnxruntime
sessions) takes a second or so to load, so ``FaceAnalyzers`` keeps one per pack files and device for
the whole WebUI session. What it finds in a reference image depends only on the two model files, the
pixels and which face is asked for, so the embeddings (raw and unit-length) and the aligned crop
(FaceID Plus gives CLIP the 224 crop) go into the encoding cache under exactly that key
(``FaceKey``), as CLIP outputs do: a repeated reference costs no detection and no recognition.

``FaceService`` is what a generation (and the ``face`` preview) use: the models folder, the pack and
device from Settings (a unit may name another pack), the analyzers and the cache.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..face import (FACEID_PLUS_CROP, DEFAULT_PACK, FaceAnalyzer, FaceDevice, FaceModelFiles, NoFaceError,
                    SessionOptions, find_face_models, pick_face)
from ..face.align import align_face
from ..preprocess.face import FaceFinder, FaceMarks
from ..preprocess.resize import to_hwc_uint8
from .cache import FileKey
from .encodings import EncodingCache, image_digest
from .units import LARGEST_FACE


@dataclass(frozen=True)
class FaceKey:
    """One reference image's face in the encoding cache: the pack's two files, the pixels, the face asked for."""

    detector: FileKey
    recognizer: FileKey
    image: str  # pixel digest
    index: int  # LARGEST_FACE or the n-th from the left
    output: str  # "embeddings" ([2, 512]: raw, unit-length) or "crop" (the aligned FACEID_PLUS_CROP crop)


@dataclass(frozen=True)
class Face:
    """What a FaceID unit reads of one reference image."""

    embedding: torch.Tensor  # [512] the recognizer's raw output (Portrait unnorm reads it)
    normed_embedding: torch.Tensor  # [512] unit length (every other FaceID)
    crop: np.ndarray | None  # [224, 224, 3] uint8 RGB when asked for (FaceID Plus)
    key: FaceKey  # the embeddings' cache key (so tokens made from them can be cached too)


@dataclass
class FaceAnalyzers:
    """Loaded analyzers by (detector file, recognizer file, device); thread-safe (preview and generation)."""

    _items: dict[tuple, FaceAnalyzer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    loads: int = 0

    def get(self, files: FaceModelFiles, device: FaceDevice) -> FaceAnalyzer:
        key = (FileKey.of(files.detector), FileKey.of(files.recognizer), device)
        with self._lock:
            if key not in self._items:
                self._items[key] = FaceAnalyzer(files, SessionOptions(device=device))
                self.loads += 1
            return self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass
class FaceService:
    models_dir: Path  # the WebUI's models folder: packs in <models_dir>/insightface/models/<pack>/
    analyzers: FaceAnalyzers
    encodings: EncodingCache
    pack: str = DEFAULT_PACK  # Settings' pack, for units that name none
    device: FaceDevice = FaceDevice.CPU

    def files(self, pack: str = "") -> FaceModelFiles:
        """The pack's detector and recognizer (``MissingFileError`` saying which file goes where)."""
        return find_face_models(self.models_dir, pack or self.pack)

    def faces(self, label: str, images: Sequence[np.ndarray], pack: str = "", index: int = LARGEST_FACE,
              crops: bool = False) -> list[Face]:
        """The chosen face of every image, from the cache or analysed now; ``NoFaceError`` names the image."""
        files = self.files(pack)
        detector, recognizer = FileKey.of(files.detector), FileKey.of(files.recognizer)
        found = []
        for number, image in enumerate(images):
            key = FaceKey(detector, recognizer, image_digest(image), index, "embeddings")
            analysed: list[Any] = []

            def analyse(image: np.ndarray = image, analysed: list = analysed) -> Any:
                if not analysed:
                    analyzer = self.analyzers.get(files, self.device)
                    try:
                        analysed.append(analyzer.analyze(image, None if index == LARGEST_FACE else index,
                                                         FACEID_PLUS_CROP if crops else None))
                    except NoFaceError as exc:
                        where = f"reference image {number + 1}: " if len(images) > 1 else ""
                        raise NoFaceError(f"{label}: {where}{exc}") from exc
                return analysed[0]

            both = self.encodings.get(key, lambda: torch.from_numpy(np.stack([analyse().embedding,
                                                                               analyse().normed_embedding])))
            crop = None
            if crops:
                crop_key = FaceKey(detector, recognizer, key.image, index, "crop")
                crop = self.encodings.get(crop_key, lambda: torch.from_numpy(analyse().aligned_crop)).numpy()
            found.append(Face(both[0], both[1], crop, key))
        return found

    def finder(self, pack: str = "", index: int = LARGEST_FACE) -> FaceFinder:
        """The ``face`` preprocessor's detector for a unit: every face, the one the unit picks, its crop."""
        def find(image: np.ndarray) -> FaceMarks:
            pixels = to_hwc_uint8(image)
            analyzer = self.analyzers.get(self.files(pack), self.device)
            detections = analyzer.detect(pixels)
            chosen, position = pick_face(detections, None if index == LARGEST_FACE else index)
            if detections.keypoints is None:
                raise InputError("this face detector finds no keypoints, which FaceID needs to align faces; use "
                                 "det_10g.onnx (buffalo_l) or scrfd_10g_bnkps.onnx (antelopev2).")
            crop = align_face(pixels, detections.keypoints[chosen], FACEID_PLUS_CROP)
            return FaceMarks(detections.boxes, detections.keypoints, chosen, position, crop)

        return find

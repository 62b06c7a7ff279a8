"""Face analysis for FaceID: detect, pick one face, align it, embed it.

``FaceAnalyzer`` owns the two onnxruntime sessions (detector, recognizer) of one model pack; make
it once and reuse it for every image of a generation. ``analyze`` returns a ``FaceResult`` for the
face the unit asked for: the largest by default, or the n-th from the left. No face is a
``NoFaceError`` (an ``InputError``) so the caller can skip the unit with its message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..preprocess.resize import to_hwc_uint8
from .align import align_face
from .arcface import ArcFaceRecognizer, l2_normalise
from .discovery import DEFAULT_PACK, FaceModelFiles, find_face_models
from .onnx_info import read_graph_info
from .runtime import SessionOptions, create_session
from .scrfd import DEFAULT_DET_SIZE, Detections, SCRFDDetector

FACEID_PLUS_CROP = 224  # the CLIP input of FaceID Plus: the aligned crop at 2x the ArcFace template


class NoFaceError(InputError):
    """No face (or not the face asked for) in the image: skip the unit and say why."""


@dataclass(frozen=True)
class DetectorSettings:
    size: tuple[int, int] = DEFAULT_DET_SIZE  # (width, height), multiples of 32
    threshold: float = 0.5
    nms_threshold: float = 0.4

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) < 32 or int(s) % 32 for s in self.size):
            raise InputError(f"the face detection size {self.size} must be two multiples of 32 (e.g. 640x640).")
        if not (0 < self.threshold < 1 and 0 < self.nms_threshold <= 1):
            raise InputError(f"face detection thresholds must lie in (0, 1), got {self.threshold} and "
                             f"{self.nms_threshold}.")


@dataclass(frozen=True)
class FaceResult:
    box: np.ndarray  # [4] float32 x1, y1, x2, y2 in image pixels
    score: float
    keypoints: np.ndarray  # [5, 2] float32: eyes, nose tip, mouth corners
    embedding: np.ndarray  # [512] float32, the recognizer's raw output
    normed_embedding: np.ndarray  # [512] float32, unit length: what FaceID projections take
    index: int  # position of this face among the detected ones, left to right
    faces_found: int
    aligned_crop: np.ndarray | None = None  # [S, S, 3] uint8 RGB, when asked for (FaceID Plus: 224)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def left_to_right(detections: Detections) -> np.ndarray:
    """Detection indices sorted by box centre x (ties: by centre y)."""
    cx = (detections.boxes[:, 0] + detections.boxes[:, 2]) / 2
    cy = (detections.boxes[:, 1] + detections.boxes[:, 3]) / 2
    return np.lexsort((cy, cx))


def pick_face(detections: Detections, index: int | None = None) -> tuple[int, int]:
    """(detection index, left-to-right position) of the largest face, or of the ``index``-th from the left."""
    count = len(detections)
    if count == 0:
        raise NoFaceError("No face found in the image. Use a photo where the face is clearly visible "
                          "(frontal, not tiny, not cut off); the unit is skipped.")
    order = left_to_right(detections)
    if index is None:
        chosen = int(np.argmax(box_areas(detections.boxes)))
        return chosen, int(np.where(order == chosen)[0][0])
    if not 0 <= index < count:
        raise NoFaceError(f"Face {index} (counting from 0, left to right) was asked for, but the image has "
                          f"{count} face{'s' if count != 1 else ''}. Pick an index from 0 to {count - 1}, or "
                          "leave it empty for the largest face; the unit is skipped.")
    return int(order[index]), index


class FaceAnalyzer:
    """A detector and a recognizer session, and the settings to use them with."""

    def __init__(self, files: FaceModelFiles, options: SessionOptions = SessionOptions(),
                 detector: DetectorSettings = DetectorSettings()):
        self.files = files
        self.settings = detector
        self.detector = SCRFDDetector(create_session(files.detector, options), files.detector.name)
        self.recognizer = ArcFaceRecognizer(create_session(files.recognizer, options),
                                            read_graph_info(files.recognizer), files.recognizer.name)

    @classmethod
    def from_models_dir(cls, models_dir: str | Path, pack: str = DEFAULT_PACK,
                        options: SessionOptions = SessionOptions(),
                        detector: DetectorSettings = DetectorSettings()) -> "FaceAnalyzer":
        return cls(find_face_models(models_dir, pack), options, detector)

    def detect(self, image: Any) -> Detections:
        """All faces in ``image`` (PIL image or H x W x 3 array), best score first."""
        s = self.settings
        return self.detector.detect(to_hwc_uint8(image), s.size, s.threshold, s.nms_threshold)

    def analyze(self, image: Any, index: int | None = None, crop_size: int | None = None) -> FaceResult:
        """The chosen face with its embeddings, and its ``crop_size`` aligned crop when asked for."""
        pixels = to_hwc_uint8(image)
        s = self.settings
        found = self.detector.detect(pixels, s.size, s.threshold, s.nms_threshold)
        chosen, position = pick_face(found, index)
        if found.keypoints is None:
            raise InputError(f"{self.files.detector.name} finds faces without keypoints, which FaceID needs to "
                             "align them. Use det_10g.onnx (buffalo_l) or scrfd_10g_bnkps.onnx (antelopev2).")
        keypoints = found.keypoints[chosen]
        embedding = self.recognizer.embed([align_face(pixels, keypoints, self.recognizer.size)])[0]
        crop = align_face(pixels, keypoints, crop_size) if crop_size else None
        return FaceResult(box=found.boxes[chosen], score=float(found.scores[chosen]), keypoints=keypoints,
                          embedding=embedding, normed_embedding=l2_normalise(embedding), index=position,
                          faces_found=len(found), aligned_crop=crop)

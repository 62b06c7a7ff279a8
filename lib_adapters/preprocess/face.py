"""The ``face`` preprocessor: what face analysis found, drawn for the preview of a FaceID unit.

Face analysis itself lives in ``lib_adapters/face`` (which builds on this package, so it cannot be
imported here); the caller passes, as the preprocessor's ``detector``, a function from an image to
``FaceMarks``: every face's box and 5 keypoints, which one the unit uses, and that face's aligned
crop. This module only draws: every box (the chosen face in green, the others in grey), the chosen
face's keypoints (eyes blue, nose green, mouth corners red, as insightface draws them), its
position from the left, and the aligned crop beside the image at the image's height.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ..errors import MissingFileError
from .spec import RunParams

CHOSEN, OTHER = (0, 220, 0), (160, 160, 160)
KEYPOINT_COLOURS = ((0, 0, 255), (0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 0, 0))  # RGB, as insightface's draw_on
GAP = 8  # pixels between the image and the crop


@dataclass(frozen=True)
class FaceMarks:
    boxes: np.ndarray  # [N, 4] x1, y1, x2, y2 in image pixels
    keypoints: Optional[np.ndarray]  # [N, 5, 2]: eyes, nose tip, mouth corners
    chosen: int  # index into boxes of the face the unit uses
    position: int  # the chosen face's place from the left (0: leftmost)
    crop: Optional[np.ndarray]  # [S, S, 3] uint8 RGB: the chosen face aligned as the model sees it


FaceFinder = Callable[[np.ndarray], FaceMarks]


def draw_face_marks(image: np.ndarray, marks: FaceMarks) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with the boxes and keypoints drawn, the crop beside it."""
    canvas = np.ascontiguousarray(image.copy())
    thickness = max(1, round(min(canvas.shape[:2]) / 256))
    for i, box in enumerate(marks.boxes):
        if i == marks.chosen:
            continue
        _rectangle(canvas, box, OTHER, thickness)
    box = marks.boxes[marks.chosen]
    _rectangle(canvas, box, CHOSEN, thickness + 1)
    if marks.keypoints is not None:
        radius = max(2, round(float(box[2] - box[0]) / 40))
        for point, colour in zip(marks.keypoints[marks.chosen], KEYPOINT_COLOURS):
            cv2.circle(canvas, (int(round(point[0])), int(round(point[1]))), radius, colour, -1, cv2.LINE_AA)
    label_at = (int(box[0]), max(12, int(box[1]) - 4))
    cv2.putText(canvas, str(marks.position), label_at, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness + 0.2, CHOSEN,
                thickness, cv2.LINE_AA)
    return canvas if marks.crop is None else _beside(canvas, marks.crop)


def _rectangle(canvas: np.ndarray, box: np.ndarray, colour: tuple, thickness: int) -> None:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)


def _beside(canvas: np.ndarray, crop: np.ndarray) -> np.ndarray:
    height = canvas.shape[0]
    side = cv2.resize(crop, (height, height), interpolation=cv2.INTER_AREA if crop.shape[0] > height
                      else cv2.INTER_LINEAR)
    out = np.zeros((height, canvas.shape[1] + GAP + height, 3), dtype=np.uint8)
    out[:, :canvas.shape[1]] = canvas
    out[:, canvas.shape[1] + GAP:] = side
    return out


def run_face(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """The preview: ``detector`` is the unit's ``FaceFinder`` (its face models, its face index)."""
    if detector is None:
        raise MissingFileError("the face preprocessor needs the face models of a FaceID unit: put insightface's "
                               "buffalo_l folder in models/insightface/models/ and pick a FaceID model.")
    return draw_face_marks(image, detector(image))

"""SCRFD face detection (insightface's det_10g / scrfd_*_bnkps graphs) decoded by our own code.

The graph does the convolutions; everything around it happens here, with the same numbers as
insightface's ``model_zoo/scrfd.py`` so boxes and keypoints match it:

1. letterbox: the RGB image is resized (bilinear) to fit the detector size keeping its aspect,
   pasted at the top-left of a black canvas, and normalised to ``(x - 127.5) / 128``, NCHW.
2. the graph returns, per stride (8, 16, 32 with 2 anchors per location; or 8..128 with 1), a
   score per anchor, 4 distances (left, top, right, bottom) and, for the ``kps`` graphs, 5 (x, y)
   keypoint offsets, all in units of the stride. Outputs are matched to (stride, kind) by their
   shapes, so both the ``[N, C]`` and the batched ``[1, N, C]`` exports and any output order work.
3. anchors: location (x, y) of a stride-s grid is centred at ``(x * s, y * s)``, repeated once per
   anchor; ``box = (cx - d0, cy - d1, cx + d2, cy + d3)``, ``kp_k = (cx + o_2k, cy + o_2k+1)``.
4. keep scores >= threshold, sort by score, greedy NMS (IoU with insightface's +1 pixel areas,
   suppress above 0.4), then divide by the letterbox scale to get original-image coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from ..errors import FormatError, InputError

DET_MEAN, DET_STD = 127.5, 128.0
DEFAULT_DET_SIZE = (640, 640)  # (width, height), insightface's FaceAnalysis default
_KIND_BY_WIDTH = {1: "score", 4: "box", 10: "kps"}


@dataclass(frozen=True)
class DetectorSpec:
    """What the graph's signature says: strides, anchors per location, keypoints or not."""

    input_name: str
    output_names: tuple[str, ...]
    strides: tuple[int, ...]
    num_anchors: int
    has_keypoints: bool
    fixed_size: tuple[int, int] | None  # (width, height) when the graph fixes its input size

    @classmethod
    def from_signature(cls, input_name: str, input_shape: Sequence[Any], output_names: Sequence[str],
                       source: str = "the detector") -> "DetectorSpec":
        count = len(output_names)
        layouts = {6: ((8, 16, 32), 2, False), 9: ((8, 16, 32), 2, True),
                   10: ((8, 16, 32, 64, 128), 1, False), 15: ((8, 16, 32, 64, 128), 1, True)}
        if count not in layouts:
            raise FormatError(f"{source}: an SCRFD detector has 6, 9, 10 or 15 outputs, this graph has {count}. "
                              "Use det_10g.onnx (buffalo_l) or scrfd_10g_bnkps.onnx (antelopev2).")
        strides, anchors, kps = layouts[count]
        dims = list(input_shape)[2:4]
        fixed = (int(dims[1]), int(dims[0])) if len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims) \
            else None
        return cls(input_name, tuple(output_names), strides, anchors, kps, fixed)


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [N, 4] float32: x1, y1, x2, y2
    scores: np.ndarray  # [N] float32
    keypoints: np.ndarray | None  # [N, 5, 2] float32: left eye, right eye, nose, left and right mouth corner

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """``image`` (H x W x 3 uint8) fitted into a ``size`` = (width, height) black canvas at the top-left,
    keeping its aspect; returns the canvas and the scale (canvas pixels per image pixel)."""
    height, width = image.shape[:2]
    image_ratio = height / width
    if image_ratio > size[1] / size[0]:
        new_h = size[1]
        new_w = int(new_h / image_ratio)
    else:
        new_w = size[0]
        new_h = int(new_w * image_ratio)
    if new_w < 1 or new_h < 1:
        raise InputError(f"the image ({width}x{height}) is too thin to look for faces in.")
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, new_h / height


def to_blob(canvas: np.ndarray, mean: float = DET_MEAN, std: float = DET_STD) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 1 x 3 x H x W float32, ``(x - mean) / std``."""
    return ((canvas.astype(np.float32) - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)[None].copy()


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """[height * width * num_anchors, 2] (x, y) centres, row by row, each repeated per anchor."""
    ys, xs = np.mgrid[:height, :width]
    centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centers, num_anchors, axis=0)


def distance_to_boxes(centers: np.ndarray, distances: np.ndarray) -> np.ndarray:
    return np.stack([centers[:, 0] - distances[:, 0], centers[:, 1] - distances[:, 1],
                     centers[:, 0] + distances[:, 2], centers[:, 1] + distances[:, 3]], axis=-1)


def distance_to_keypoints(centers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[N, 2K] offsets -> [N, K, 2] points."""
    return centers[:, None, :] + offsets.reshape(offsets.shape[0], offsets.shape[1] // 2, 2)


def group_outputs(outputs: Sequence[np.ndarray], input_hw: tuple[int, int], spec: DetectorSpec
                  ) -> dict[tuple[int, str], np.ndarray]:
    """{(stride, "score"|"box"|"kps"): [N, C]} from the graph's outputs, matched by shape."""
    height, width = input_hw
    rows = {(height // s) * (width // s) * spec.num_anchors: s for s in spec.strides}
    arrays = [np.asarray(o)[0] if np.asarray(o).ndim == 3 else np.asarray(o) for o in outputs]
    groups: dict[tuple[int, str], np.ndarray] = {}
    if len(rows) == len(spec.strides):  # every stride has its own row count: match by shape
        for array in arrays:
            key = (rows.get(array.shape[0]) if array.ndim == 2 else None,
                   _KIND_BY_WIDTH.get(array.shape[-1]) if array.ndim == 2 else None)
            if None in key or key in groups:
                raise FormatError(f"SCRFD output of shape {array.shape} does not fit a {width}x{height} input with "
                                  f"strides {spec.strides} and {spec.num_anchors} anchors per location.")
            groups[key] = array  # type: ignore[index]
    else:  # tiny inputs where two strides give the same count: insightface's positional order
        kinds = ["score", "box"] + (["kps"] if spec.has_keypoints else [])
        for k, kind in enumerate(kinds):
            for i, stride in enumerate(spec.strides):
                groups[(stride, kind)] = arrays[k * len(spec.strides) + i]
    return groups


def decode(outputs: Sequence[np.ndarray], input_hw: tuple[int, int], spec: DetectorSpec, threshold: float
           ) -> Detections:
    """Candidates with score >= threshold in detector-input pixels, stride by stride (not yet sorted)."""
    groups = group_outputs(outputs, input_hw, spec)
    boxes, scores, points = [], [], []
    for stride in spec.strides:
        score = groups[(stride, "score")].reshape(-1).astype(np.float32)
        centers = anchor_centers(input_hw[0] // stride, input_hw[1] // stride, stride, spec.num_anchors)
        keep = np.where(score >= threshold)[0]
        scores.append(score[keep])
        boxes.append(distance_to_boxes(centers[keep], groups[(stride, "box")][keep] * stride))
        if spec.has_keypoints:
            points.append(distance_to_keypoints(centers[keep], groups[(stride, "kps")][keep] * stride))
    return Detections(boxes=np.concatenate(boxes).astype(np.float32), scores=np.concatenate(scores),
                      keypoints=np.concatenate(points).astype(np.float32) if spec.has_keypoints else None)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best first. Areas count pixels inclusively
    (``x2 - x1 + 1``) as insightface does; a box goes when its IoU with a kept one exceeds the threshold."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = inter_w * inter_h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


def select(detections: Detections, index: np.ndarray | list[int]) -> Detections:
    kps = detections.keypoints[index] if detections.keypoints is not None else None
    return Detections(detections.boxes[index], detections.scores[index], kps)


class SCRFDDetector:
    """An SCRFD graph in an onnxruntime session, with insightface's pre- and post-processing."""

    def __init__(self, session: Any, source: str = "the detector"):
        first = session.get_inputs()[0]
        self.session = session
        self.spec = DetectorSpec.from_signature(first.name, first.shape, [o.name for o in session.get_outputs()],
                                                source)

    def detect(self, image: np.ndarray, size: tuple[int, int] = DEFAULT_DET_SIZE, threshold: float = 0.5,
               nms_threshold: float = 0.4) -> Detections:
        """Faces in ``image`` (H x W x 3 uint8 RGB), best score first, in the image's pixels."""
        size = self.spec.fixed_size or size
        canvas, scale = letterbox(image, size)
        outputs = self.session.run(list(self.spec.output_names), {self.spec.input_name: to_blob(canvas)})
        found = decode(outputs, (size[1], size[0]), self.spec, threshold)
        order = found.scores.argsort()[::-1]
        found = select(found, order)
        kept = select(found, nms(found.boxes, found.scores, nms_threshold))
        return Detections(kept.boxes / np.float32(scale), kept.scores,
                          kept.keypoints / np.float32(scale) if kept.keypoints is not None else None)

"""A face model pack of controlled ONNX graphs in a WebUI models folder, and images with faces where a test wants them.

The pack is ``tests/face/onnx_graphs``' controlled SCRFD (stride 8 fires on red cells, 32 on blue cells, one box
and five keypoints per firing cell) and its pooling ArcFace, written as insightface's ``buffalo_l`` folder under
``<models>/insightface/models``. A "face" is a saturated 32x32 blue square on a stride-32 cell (8x8 red on a
stride-8 cell for a small one) of a 640x480 image (the detector's letterbox keeps it at scale 1), on a textured
background that gives every image its own aligned crop and so its own embedding.

Not a test module (no ``test_`` prefix).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lib_adapters.face import face_models_root

from .onnx_graphs import STRIDES, arcface_graph, controlled_heads, scrfd_graph

RECOGNIZER_WEIGHT = np.random.default_rng(3).normal(0, 0.1, (3 * 14 * 14, 512)).astype(np.float32)
BOXES = {s: (np.array([1.0, 1.2, 1.0, 1.4]), np.ones(4)) for s in STRIDES}
# eyes at (-+0.4, -0.3), nose (0, 0.1), mouth corners (-+0.3, 0.5), in strides
KEYPOINTS = {s: np.tile(np.array([-0.4, -0.3, 0.4, -0.3, 0.0, 0.1, -0.3, 0.5, 0.3, 0.5]), (2, 1)) for s in STRIDES}


def write_pack(models_dir: Path, pack: str = "buffalo_l") -> Path:
    folder = face_models_root(models_dir) / pack
    scrfd_graph(folder / "det_10g.onnx", controlled_heads(BOXES, KEYPOINTS, second_anchor=100.0))
    arcface_graph(folder / "w600k_r50.onnx", RECOGNIZER_WEIGHT)
    return folder


def face_image(seed: int = 0, big: tuple[int, int] | None = (2, 5), small: tuple[int, int] | None = None
               ) -> np.ndarray:
    """640x480 RGB: a big face at stride-32 cell ``big`` (column, row), a small one at stride-8 cell ``small``;
    ``big=None, small=None``: no face at all."""
    rng = np.random.default_rng(seed)
    image = np.zeros((480, 640, 3), np.uint8)
    image[..., 1] = rng.integers(0, 60, (480, 640))  # green texture only: too dark for the green stride to fire
    if big is not None:
        x, y = big[0] * 32, big[1] * 32
        image[y:y + 32, x:x + 32, 2] = 255
    if small is not None:
        x, y = small[0] * 8, small[1] * 8
        image[y:y + 8, x:x + 8, 0] = 255
    return image

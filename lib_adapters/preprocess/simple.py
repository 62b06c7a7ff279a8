"""Preprocessors that need no weights: identity, invert, canny, threshold, colour grid.

Each function has the ``RunFn`` shape ``(image, detector, params) -> map``; ``image`` is already
HWC uint8 RGB and ``detector`` is always None here.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .resize import resize_exact, short_side_size
from .spec import RunParams

# The T2I colour adapter was trained on images reduced to one colour per 64x64 cell.
COLOR_GRID_CELL = 64


def _at_resolution(image: np.ndarray, params: RunParams) -> np.ndarray:
    """Resize so the short side equals the working resolution (aspect ratio kept)."""
    assert params.resolution is not None  # table entries that call this always have one
    height, width = short_side_size(image.shape[0], image.shape[1], params.resolution)
    return resize_exact(image, width, height)


def run_none(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """The image as given: for hints the user prepared already (depth, pose, seg maps, ...)."""
    return image


def run_invert(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """255 - image: turns black-on-white drawings into the white-on-black lines adapters expect."""
    return 255 - image


def run_canny(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Canny edges (white on black) at the working resolution.

    cv2.Canny takes the colour image directly and uses the strongest channel gradient, so edges
    between colours of equal brightness are found too.
    """
    assert params.threshold_a is not None and params.threshold_b is not None
    resized = _at_resolution(image, params)
    edges = cv2.Canny(resized, int(params.threshold_a), int(params.threshold_b))
    return np.repeat(edges[:, :, None], 3, axis=2)


def run_threshold(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Binary map: white where every channel is above the threshold (as sd-webui-controlnet)."""
    assert params.threshold_a is not None
    resized = _at_resolution(image, params)
    mask = resized.min(axis=2) > params.threshold_a
    return np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2)


def run_color_grid(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """One colour per 64x64 cell: bicubic down by 64, nearest back up (T2I colour adapter).

    The image is edge-padded to a multiple of the cell first so every cell, including the last
    row/column, is a full 64x64 block anchored at the top-left corner; the padding is cut off again.
    """
    resized = _at_resolution(image, params)
    height, width = resized.shape[:2]
    cell = COLOR_GRID_CELL
    pad_h, pad_w = -height % cell, -width % cell
    padded = np.pad(resized, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rows, cols = padded.shape[0] // cell, padded.shape[1] // cell
    small = cv2.resize(padded, (cols, rows), interpolation=cv2.INTER_CUBIC).reshape(rows, cols, -1)
    grid = np.repeat(np.repeat(small, cell, axis=0), cell, axis=1)
    return np.ascontiguousarray(grid[:height, :width])

"""5-point face alignment: the similarity transform onto ArcFace's template, and the warped crop.

ArcFace models were trained on 112x112 crops where the eyes, the nose tip and the mouth corners sit
at fixed points (``ARCFACE_TEMPLATE``). We estimate the similarity transform (rotation, uniform
scale, translation; no shear, no reflection) that maps the detected keypoints onto the template in
the least-squares sense, in closed form (Umeyama 1991, the method skimage's
``SimilarityTransform.estimate`` uses, which insightface calls), and warp with ``cv2.warpAffine``
(bilinear, black outside) as insightface's ``face_align.norm_crop`` does. Crops of other sizes use
the template scaled by ``size / 112`` (by ``size / 128`` plus a horizontal shift for multiples of
128), insightface's rule: FaceID Plus feeds CLIP the 224x224 crop.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import InputError

# left eye, right eye, nose tip, left mouth corner, right mouth corner (image left/right), 112x112
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def template_for(size: int) -> np.ndarray:
    """The template for a ``size`` x ``size`` crop (``size`` a multiple of 112 or of 128)."""
    if size > 0 and size % 112 == 0:
        return ARCFACE_TEMPLATE * np.float32(size / 112.0)
    if size > 0 and size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * np.float32(ratio) + np.array([8.0 * ratio, 0.0], dtype=np.float32)
    raise InputError(f"aligned face crops are 112, 224, ... or 128, 256, ... pixels wide, not {size}.")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M of the similarity transform minimising sum |M [src; 1] - dst|^2.

    Umeyama: with centred point sets, the covariance A = dst_c^T src_c / n has SVD U S V^T; the
    rotation is U D V^T with D = diag(1, sign) choosing a proper rotation, the scale is
    trace(S D) / (mean squared distance of src from its centroid), and the translation maps
    the src centroid onto the dst centroid."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    variance = src_c.var(axis=0).sum()
    if variance <= 0 or np.linalg.matrix_rank(cov) == 0:
        raise InputError("the face keypoints coincide; the face cannot be aligned.")
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / variance
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 matrix taking image pixels to the ``size`` crop's pixels for these 5 keypoints."""
    keypoints = np.asarray(keypoints, dtype=np.float32)
    if keypoints.shape != (5, 2):
        raise InputError(f"face alignment needs 5 (x, y) keypoints, got an array of shape {keypoints.shape}.")
    return similarity_transform(keypoints, template_for(size))


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` aligned crop of ``image`` (H x W x C uint8), as ``norm_crop`` makes it."""
    matrix = alignment_matrix(keypoints, size)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)

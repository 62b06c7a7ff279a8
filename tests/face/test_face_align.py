"""5-point alignment: the estimated similarity maps the keypoints onto ArcFace's template, a face
rotated and scaled by a known transform aligns back, and the estimator agrees with skimage's
(the one insightface calls)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lib_adapters.errors import InputError
from lib_adapters.face.align import (ARCFACE_TEMPLATE, align_face, alignment_matrix, apply_matrix,
                                     similarity_transform, template_for)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _invert(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0, 1, 0, 0), (17, 2.5, 140, 60), (-40, 0.6, -5, 300), (179, 3, 9, 9)])
def test_an_exact_similarity_is_recovered_with_a_tiny_residual(angle, scale, tx, ty):
    truth = _similarity(angle, scale, tx, ty)
    src = np.random.default_rng(0).uniform(0, 200, (5, 2))
    estimated = similarity_transform(src, apply_matrix(truth, src))
    assert np.abs(estimated - truth).max() < 1e-9
    assert np.abs(apply_matrix(estimated, src) - apply_matrix(truth, src)).max() < 1e-9


def test_the_keypoints_of_a_rotated_scaled_face_land_on_the_template():
    to_crop = _similarity(25, 0.4, -30, 80)  # image -> crop
    keypoints = apply_matrix(_invert(to_crop), ARCFACE_TEMPLATE)  # where the face's points are in the image
    matrix = alignment_matrix(keypoints.astype(np.float32), 112)
    assert np.abs(matrix - to_crop).max() < 1e-4  # float32 keypoints
    assert np.abs(apply_matrix(matrix, keypoints) - ARCFACE_TEMPLATE).max() < 1e-3


def test_noisy_keypoints_give_the_least_squares_fit():
    rng = np.random.default_rng(1)
    truth = _similarity(-12, 1.7, 20, 30)
    src = rng.uniform(0, 100, (5, 2))
    dst = apply_matrix(truth, src) + rng.normal(0, 0.5, (5, 2))
    best = similarity_transform(src, dst)
    residual = ((apply_matrix(best, src) - dst) ** 2).sum()
    for _ in range(50):  # no nearby similarity fits better
        a, s, t = rng.normal(0, 0.01), 1 + rng.normal(0, 0.01), rng.normal(0, 0.1, 2)
        nudged = _similarity(np.rad2deg(a), s, *t)
        candidate = np.vstack([nudged, [0, 0, 1]]) @ np.vstack([best, [0, 0, 1]])
        assert ((apply_matrix(candidate[:2], src) - dst) ** 2).sum() >= residual - 1e-9


def test_the_estimator_matches_skimage_on_random_points():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(2)
    for _ in range(20):
        src = rng.uniform(0, 640, (5, 2)).astype(np.float32)
        tform = skimage_transform.SimilarityTransform()
        tform.estimate(src, ARCFACE_TEMPLATE)
        assert np.abs(alignment_matrix(src, 112) - tform.params[:2]).max() < 1e-4


def test_a_known_face_aligns_back_to_its_crop():
    """Draw a smooth 112x112 'face', place it rotated and enlarged in a big image, align it back."""
    yy, xx = np.mgrid[:112, :112].astype(np.float32)
    face = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 11), 128 + 60 * np.sin((xx + yy) / 13)], -1)
    face = face.clip(0, 255).astype(np.uint8)
    to_crop = _similarity(30, 0.5, 19.4, -80.6)  # the face appears 2x larger, rotated, centred in the image
    image = cv2.warpAffine(face, _invert(to_crop), (400, 400), flags=cv2.INTER_CUBIC)
    keypoints = apply_matrix(_invert(to_crop), ARCFACE_TEMPLATE).astype(np.float32)
    aligned = align_face(image, keypoints, 112)
    inner = (slice(8, 104), slice(8, 104))  # away from the border, where resampling smears
    assert np.abs(aligned[inner].astype(int) - face[inner].astype(int)).mean() < 2.0


def test_larger_crops_scale_the_template_as_insightface_does():
    assert np.array_equal(template_for(112), ARCFACE_TEMPLATE)
    assert np.allclose(template_for(224), ARCFACE_TEMPLATE * 2)
    assert np.allclose(template_for(256), ARCFACE_TEMPLATE * 2 + [16, 0])
    keypoints = ARCFACE_TEMPLATE * 3 + [50, 20]
    m224 = alignment_matrix(keypoints, 224)
    assert np.abs(apply_matrix(m224, keypoints) - ARCFACE_TEMPLATE * 2).max() < 1e-4
    assert align_face(np.zeros((500, 500, 3), np.uint8), keypoints, 224).shape == (224, 224, 3)
    with pytest.raises(InputError, match="112, 224"):
        template_for(100)


def test_bad_keypoints_are_input_errors():
    with pytest.raises(InputError, match="5"):
        alignment_matrix(np.zeros((4, 2)), 112)
    with pytest.raises(InputError, match="coincide"):
        alignment_matrix(np.ones((5, 2)), 112)

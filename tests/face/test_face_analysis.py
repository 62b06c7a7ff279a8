"""FaceAnalyzer end to end on a model pack of controlled graphs: the largest face by default, the
n-th from the left on request, no face as a ``NoFaceError``, the embedding and the aligned crop."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_adapters.errors import InputError
from lib_adapters.face import FACEID_PLUS_CROP, FaceAnalyzer, NoFaceError, SessionOptions, face_models_root
from lib_adapters.face.align import align_face, alignment_matrix, apply_matrix
from onnx_graphs import STRIDES, arcface_by_hand, arcface_graph, controlled_heads, scrfd_graph

W = np.random.default_rng(3).normal(0, 0.1, (3 * 14 * 14, 512)).astype(np.float32)
BOXES = {s: (np.array([1.0, 1.2, 1.0, 1.4]), np.ones(4)) for s in STRIDES}
# eyes at (-+0.4, -0.3), nose (0, 0.1), mouth corners (-+0.3, 0.5), in strides
KPS = {s: np.tile(np.array([-0.4, -0.3, 0.4, -0.3, 0.0, 0.1, -0.3, 0.5, 0.3, 0.5]), (2, 1)) for s in STRIDES}


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    folder = face_models_root(models) / "buffalo_l"
    scrfd_graph(folder / "det_10g.onnx", controlled_heads(BOXES, KPS, second_anchor=100.0))  # one box per cell
    arcface_graph(folder / "w600k_r50.onnx", W)
    return FaceAnalyzer.from_models_dir(models, "buffalo_l", SessionOptions(threads=1))


def _two_faces():
    """640x480: a big 'face' (blue, stride-32 cell (2, 5)) on the left, a small one (red, stride-8 cell (60, 10))
    on the right, on a textured background so the aligned crops are not flat."""
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 60, (480, 640, 3))).astype(np.uint8)
    image[..., 2] = 0
    image[..., 0] = 0  # only green texture: no stride fires on it (green = stride 16, too dark to pass)
    image[160:192, 64:96, 2] = 255
    image[80:88, 480:488, 0] = 255
    return image


def test_the_largest_face_by_default(analyzer):
    face = analyzer.analyze(_two_faces())
    assert face.faces_found == 2 and face.index == 0
    # blue cell centre (64, 160), stride 32: box (64-32, 160-38.4, 64+32, 160+44.8)
    assert face.box.tolist() == pytest.approx([32, 121.6, 96, 204.8])
    assert np.allclose(face.keypoints, [[51.2, 150.4], [76.8, 150.4], [64, 163.2], [54.4, 176], [73.6, 176]])
    assert face.aligned_crop is None


def test_faces_are_counted_left_to_right(analyzer):
    image = _two_faces()
    right = analyzer.analyze(image, index=1)
    assert right.index == 1 and right.box.tolist() == pytest.approx([480 - 8, 80 - 9.6, 480 + 8, 80 + 11.2])
    assert analyzer.analyze(image, index=0).box.tolist() == analyzer.analyze(image).box.tolist()
    with pytest.raises(NoFaceError, match="image has 2 faces"):
        analyzer.analyze(image, index=2)


def test_no_face_is_an_input_error_the_caller_can_skip_on(analyzer):
    with pytest.raises(NoFaceError, match="No face found") as info:
        analyzer.analyze(np.zeros((200, 300, 3), np.uint8))
    assert isinstance(info.value, InputError)


def test_embedding_of_the_aligned_face_and_its_unit_normed_form(analyzer):
    image = _two_faces()
    face = analyzer.analyze(Image.fromarray(image), crop_size=FACEID_PLUS_CROP)
    expected = arcface_by_hand(align_face(image, face.keypoints, 112), W)
    assert np.abs(face.embedding - expected).max() < 1e-4
    assert abs(float(np.linalg.norm(face.normed_embedding)) - 1) < 1e-6
    assert np.abs(face.normed_embedding - expected / np.linalg.norm(expected)).max() < 1e-6
    assert face.aligned_crop.shape == (224, 224, 3)
    assert np.array_equal(face.aligned_crop, align_face(image, face.keypoints, 224))
    # the warp goes the right way: the blue square's centre (80, 176) lands blue in the crop, its
    # top-left outside corner (60, 156) lands on the dark background
    matrix = alignment_matrix(face.keypoints, 224)
    inside, outside = apply_matrix(matrix, np.array([[80.0, 176.0], [60.0, 156.0]])).round().astype(int)
    assert face.aligned_crop[inside[1], inside[0], 2] == 255 and face.aligned_crop[outside[1], outside[0], 2] == 0


def test_detect_returns_every_face_best_first(analyzer):
    found = analyzer.detect(_two_faces())
    assert len(found) == 2 and found.scores[0] >= found.scores[1]


def test_detector_settings_are_checked():
    from lib_adapters.face import DetectorSettings

    assert DetectorSettings((320, 640)).size == (320, 640)
    for bad in (dict(size=(600, 640)), dict(size=(640,)), dict(threshold=0.0), dict(nms_threshold=1.5)):
        with pytest.raises(InputError):
            DetectorSettings(**bad)

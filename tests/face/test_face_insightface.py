"""Our face analysis against the insightface package on the same random graphs.

insightface (0.7.3) needs a C++ build and is not a test dependency: this module is skipped where it
is absent. Run it in an environment that has it: ``pip install numpy==1.26.4 onnxruntime onnx
opencv-python-headless cython pytest`` then ``pip install --no-build-isolation insightface==0.7.3``
(gcc/g++ needed), then ``python -m pytest tests/face`` there (tests/face needs no torch).
The graphs have the released signatures (det_10g: input ``input.1`` [1, 3, ?, ?], 9 outputs; ArcFace:
[None, 3, 112, 112] -> [1, 512]) with random weights; insightface reads BGR images, we read RGB.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

insightface_app = pytest.importorskip("insightface.app")
face_align = pytest.importorskip("insightface.utils.face_align")
model_zoo_scrfd = pytest.importorskip("insightface.model_zoo.scrfd")

from lib_adapters.face import FaceAnalyzer, SessionOptions, face_models_root  # noqa: E402
from lib_adapters.face.align import align_face, alignment_matrix  # noqa: E402
from lib_adapters.face.runtime import create_session  # noqa: E402
from lib_adapters.face.scrfd import SCRFDDetector  # noqa: E402
from onnx_graphs import arcface_graph, random_heads, scrfd_graph  # noqa: E402

W = np.random.default_rng(11).normal(0, 0.1, (3 * 14 * 14, 512)).astype(np.float32)


def _image(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (30, 40, 3)).astype(np.uint8), (width, height),
                      interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    folder = face_models_root(root) / "testpack"
    scrfd_graph(folder / "det_10g.onnx", random_heads(0))
    arcface_graph(folder / "w600k_r50.onnx", W)
    scrfd_graph(root / "batched" / "det_batched.onnx", random_heads(0), batched=True)
    return root


@pytest.fixture(scope="module")
def both(pack):
    theirs = insightface_app.FaceAnalysis(name="testpack", root=str(pack / "insightface"),
                                          allowed_modules=["detection", "recognition"],
                                          providers=["CPUExecutionProvider"])
    theirs.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    return FaceAnalyzer.from_models_dir(pack, "testpack", SessionOptions(threads=1)), theirs


@pytest.mark.parametrize("seed,width,height", [(5, 800, 600), (6, 480, 720), (7, 640, 640)])
def test_detection_and_embeddings_match_faceanalysis(both, seed, width, height):
    ours, theirs = both
    rgb = _image(seed, width, height)
    faces = theirs.get(np.ascontiguousarray(rgb[..., ::-1]))
    found = ours.detect(rgb)
    assert len(found) == len(faces) > 3
    assert np.abs(found.boxes - np.stack([f.bbox for f in faces])).max() < 1e-3
    assert np.abs(found.scores - np.array([f.det_score for f in faces])).max() < 1e-6
    assert np.abs(found.keypoints - np.stack([f.kps for f in faces])).max() < 1e-3
    embeddings = ours.recognizer.embed([align_face(rgb, kps, 112) for kps in found.keypoints])
    reference = np.stack([f.embedding for f in faces])
    assert np.abs(embeddings - reference).max() < 1e-4 * np.abs(reference).max()
    normed = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert np.abs(normed - np.stack([f.normed_embedding for f in faces])).max() < 1e-5


@pytest.mark.parametrize("batched", [False, True], ids=["plain-outputs", "batched-outputs"])
def test_detection_matches_the_scrfd_class(pack, batched):
    """FaceAnalysis 0.7.3 routes detectors to its RetinaFace class, which reads [N, C] outputs only;
    its SCRFD class also reads the batched [1, N, C] exports."""
    path = pack / "batched" / "det_batched.onnx" if batched else face_models_root(pack) / "testpack" / "det_10g.onnx"
    theirs = model_zoo_scrfd.SCRFD(str(path))
    theirs.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    ours = SCRFDDetector(create_session(path), path.name)
    rgb = _image(9, 800, 600)
    det, kpss = theirs.detect(np.ascontiguousarray(rgb[..., ::-1]), input_size=(640, 640))
    found = ours.detect(rgb, (640, 640), 0.5, 0.4)
    assert len(found) == len(det) > 3
    assert np.abs(found.boxes - det[:, :4]).max() < 1e-3 and np.abs(found.scores - det[:, 4]).max() < 1e-6
    assert np.abs(found.keypoints - kpss).max() < 1e-3


def test_aligned_crops_match_norm_crop(both):
    """Same transform (up to float32 rounding: skimage estimates in the keypoints' float32, we in float64)
    and the same warp; the random graphs' keypoints are nearly coincident, so the crops magnify a few
    pixels hundreds of times and a rounding flip at the border can change a single pixel."""
    ours, theirs = both
    rgb = _image(8, 800, 600)
    for face in theirs.get(np.ascontiguousarray(rgb[..., ::-1]))[:6]:
        for size in (112, 224, 256):
            matrix = face_align.estimate_norm(face.kps, size)
            assert np.abs(alignment_matrix(face.kps, size) - matrix).max() < 1e-5 * np.abs(matrix).max()
            reference = face_align.norm_crop(rgb, landmark=face.kps, image_size=size)
            diff = np.abs(align_face(rgb, face.kps, size).astype(int) - reference.astype(int))
            assert diff.mean() < 0.01 and (diff > 1).mean() < 1e-3, size

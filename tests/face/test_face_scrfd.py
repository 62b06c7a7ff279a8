"""SCRFD decoding checked against boxes and keypoints computed by hand.

Pure numpy first (anchor centres, distance decoding, output grouping, NMS), then a detector graph
whose outputs we control (tests/face/onnx_graphs.py) run by onnxruntime: a red 8x8 block fires one
stride-8 cell, a blue 32x32 block one stride-32 cell, and the boxes and keypoints must come back
exactly where the hand computation puts them, letterbox scale included.
"""
from __future__ import annotations

import numpy as np
import pytest

from lib_adapters.errors import FormatError
from lib_adapters.face.runtime import SessionOptions, create_session
from lib_adapters.face.scrfd import (DetectorSpec, SCRFDDetector, anchor_centers, decode, distance_to_boxes,
                                     distance_to_keypoints, letterbox, nms, to_blob)
from onnx_graphs import STRIDES, controlled_heads, scrfd_graph

SPEC9 = DetectorSpec("input.1", tuple(f"o{i}" for i in range(9)), (8, 16, 32), 2, True, None)


def test_anchor_centres_row_major_each_repeated_per_anchor():
    centres = anchor_centers(2, 3, 8, 2)
    expected = [(0, 0), (0, 0), (8, 0), (8, 0), (16, 0), (16, 0), (0, 8), (0, 8), (8, 8), (8, 8), (16, 8), (16, 8)]
    assert centres.tolist() == [list(map(float, p)) for p in expected]
    assert anchor_centers(2, 2, 32, 1).tolist() == [[0, 0], [32, 0], [0, 32], [32, 32]]


def test_distances_decode_to_boxes_and_keypoints():
    centres = np.array([[16.0, 24.0]], np.float32)
    assert distance_to_boxes(centres, np.array([[3, 4, 5, 6]], np.float32)).tolist() == [[13, 20, 21, 30]]
    offsets = np.array([[1, 2, -1, -2, 0, 0, 10, 20, -10, -20]], np.float32)
    assert distance_to_keypoints(centres, offsets).tolist() == [[[17, 26], [15, 22], [16, 24], [26, 44], [6, 4]]]


def _outputs(input_hw, hits, batched=False, order="kind"):
    """Zero scores except ``hits`` = {(stride, row): (score, dist4, kps10)}; returns the outputs as a graph would."""
    h, w = input_hw
    arrays = {}
    for s in STRIDES:
        n = (h // s) * (w // s) * 2
        arrays[("score", s)] = np.zeros((n, 1), np.float32)
        arrays[("bbox", s)] = np.ones((n, 4), np.float32)
        arrays[("kps", s)] = np.zeros((n, 10), np.float32)
    for (s, row), (score, dist, kps) in hits.items():
        arrays[("score", s)][row] = score
        arrays[("bbox", s)][row] = dist
        arrays[("kps", s)][row] = kps
    keys = ([(k, s) for k in ("score", "bbox", "kps") for s in STRIDES] if order == "kind"
            else [(k, s) for s in STRIDES for k in ("score", "bbox", "kps")])
    return [arrays[k][None] if batched else arrays[k] for k in keys]


HITS = {(8, 2 * (3 * 8 + 5) + 1): (0.9, [1, 2, 3, 4], [0.5] * 10),  # stride 8: cell x=5, y=3, anchor 1
        (32, 2 * (1 * 2 + 1)): (0.7, [2, 2, 2, 2], [0, 0, 1, 1, -1, -1, 0, 1, 1, 0])}  # stride 32: x=1, y=1


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("order", ["kind", "stride"])
def test_decode_by_hand_for_every_output_layout(batched, order):
    found = decode(_outputs((64, 64), HITS, batched, order), (64, 64), SPEC9, threshold=0.5)
    # stride 8, centre (40, 24): box (40-8, 24-16, 40+24, 24+32); every keypoint offset 0.5 * 8 = 4
    # stride 32, centre (32, 32): box +-64; keypoints (32,32) + 32 * offsets
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])
    assert found.boxes.tolist() == [[32, 8, 64, 56], [-32, -32, 96, 96]]
    assert found.keypoints.tolist() == [[[44, 28]] * 5, [[32, 32], [64, 64], [0, 0], [32, 64], [64, 32]]]


def test_threshold_is_inclusive_and_filters():
    assert len(decode(_outputs((64, 64), HITS), (64, 64), SPEC9, threshold=0.7)) == 2
    assert len(decode(_outputs((64, 64), HITS), (64, 64), SPEC9, threshold=0.71)) == 1
    assert len(decode(_outputs((64, 64), HITS), (64, 64), SPEC9, threshold=0.95)) == 0


def test_outputs_of_the_wrong_shape_are_a_format_error():
    outputs = _outputs((64, 64), HITS)
    outputs[0] = np.zeros((7, 1), np.float32)
    with pytest.raises(FormatError, match="does not fit"):
        decode(outputs, (64, 64), SPEC9, threshold=0.5)


def test_spec_from_the_signature():
    spec = DetectorSpec.from_signature("input.1", [1, 3, "?", "?"], [f"o{i}" for i in range(15)])
    assert (spec.strides, spec.num_anchors, spec.has_keypoints, spec.fixed_size) == ((8, 16, 32, 64, 128), 1, True,
                                                                                      None)
    fixed = DetectorSpec.from_signature("x", [1, 3, 480, 640], [f"o{i}" for i in range(6)])
    assert (fixed.num_anchors, fixed.has_keypoints, fixed.fixed_size) == (2, False, (640, 480))
    with pytest.raises(FormatError, match="6, 9, 10 or 15 outputs"):
        DetectorSpec.from_signature("x", [1, 3, 112, 112], ["emb"])


def test_nms_hand_cases():
    # IoU with +1 areas: boxes 0 and 1: inter 10*11=110, areas 110 and 11*11=121 -> 110/121 = 0.909: suppressed.
    # box 2 overlaps box 0 by 5x11 = 55 -> 55 / (110+110-55) = 0.333 <= 0.4: kept. Box 3 is far away.
    boxes = np.array([[0, 0, 9, 10], [0, 0, 10, 10], [5, 0, 14, 10], [100, 100, 110, 110]], np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.3], np.float32)
    # best first: 1 (0.9) suppresses 0 (IoU 0.909); 2 vs 1: inter 6*11=66 / (121+110-66)=0.4 -> kept (<= 0.4)
    assert nms(boxes, scores, 0.4) == [1, 2, 3]
    assert nms(boxes, scores, 0.39) == [1, 3]
    assert nms(boxes[[0, 2]], scores[[0, 2]], 0.4) == [1, 0]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.4) == []


def test_letterbox_keeps_aspect_top_left_and_blob_normalises():
    image = np.full((100, 200, 3), 255, np.uint8)
    canvas, scale = letterbox(image, (64, 64))
    assert scale == pytest.approx(0.32)
    assert canvas.shape == (64, 64, 3) and canvas[:32].min() == 255 and canvas[32:].max() == 0
    blob = to_blob(canvas)
    assert blob.shape == (1, 3, 64, 64) and blob.dtype == np.float32
    assert blob[0, 0, 0, 0] == pytest.approx(127.5 / 128) and blob[0, 0, 63, 0] == pytest.approx(-127.5 / 128)
    tall, tall_scale = letterbox(np.zeros((300, 100, 3), np.uint8), (64, 64))
    assert tall_scale == pytest.approx(64 / 300)


BOX_DIST = {8: (np.array([1, 1, 1, 1]), np.array([2, 2, 2, 2])), 16: (np.ones(4), np.ones(4)),
            32: (np.array([1, 1.5, 1, 2]), np.array([3, 3, 3, 3]))}
KPS = {s: np.tile(np.array([-0.5, -0.5, 0.5, -0.5, 0, 0, -0.25, 0.5, 0.25, 0.5]), (2, 1)) for s in STRIDES}


@pytest.fixture(scope="module")
def controlled_detector(tmp_path_factory):
    path = scrfd_graph(tmp_path_factory.mktemp("det") / "det.onnx", controlled_heads(BOX_DIST, KPS))
    return SCRFDDetector(create_session(path, SessionOptions(threads=1)), "det.onnx")


def _scene(height, width, blocks):
    image = np.zeros((height, width, 3), np.uint8)
    for (y0, y1, x0, x1), channel in blocks:
        image[y0:y1, x0:x1, channel] = 255
    return image


def test_controlled_graph_fires_where_the_blocks_are_and_maps_back_through_the_letterbox(controlled_detector):
    # 1280x960 -> scale 0.5 -> 640x480 on the 640x640 canvas. Red 16x16 at x 160..176, y 80..96 lands on
    # canvas 80..88 x 40..48: the stride-8 cell (10, 5), centre (80, 40). Blue 64x64 at x 768..832, y 448..512
    # lands on canvas 384..416 x 224..256: the stride-32 cell (12, 7), centre (384, 224).
    image = _scene(960, 1280, [((80, 96, 160, 176), 0), ((448, 512, 768, 832), 2)])
    found = controlled_detector.detect(image, (640, 640), threshold=0.5)
    first = 1 / (1 + np.exp(-10 * (127.5 / 128 - 0.5)))  # anchor 0; anchor 1 has its logit lowered by 1
    second = 1 / (1 + np.exp(-10 * (127.5 / 128 - 0.5) + 1))
    assert found.scores.tolist() == pytest.approx([first, first, second, second], rel=1e-5)
    # stride 8, centre (80, 40): anchor 0 +-8, anchor 1 +-16; stride 32, centre (384, 224): anchor 0
    # (-32, -48, +32, +64), anchor 1 +-96; all divided by the scale 0.5. The anchors of one cell overlap
    # with IoU 289/1089 and 7345/37249 (pixel-inclusive areas), below 0.4: all four survive NMS.
    expected = [[144, 64, 176, 96], [704, 352, 832, 576], [128, 48, 192, 112], [576, 256, 960, 640]]
    assert sorted(found.boxes.tolist()) == sorted(expected)
    assert sorted(found.boxes[:2].tolist()) == sorted(expected[:2])  # best scores: the anchor-0 boxes
    red = found.keypoints[[i for i, b in enumerate(found.boxes.tolist()) if b == [144, 64, 176, 96]][0]]
    assert red.tolist() == [[152, 72], [168, 72], [160, 80], [156, 88], [164, 88]]


def test_nothing_fires_on_a_black_image(controlled_detector):
    assert len(controlled_detector.detect(np.zeros((300, 400, 3), np.uint8))) == 0


@pytest.mark.parametrize("batched,order", [(True, "kind"), (False, "stride")])
def test_batched_and_reordered_exports_detect_the_same(tmp_path, controlled_detector, batched, order):
    path = scrfd_graph(tmp_path / "det.onnx", controlled_heads(BOX_DIST, KPS), batched=batched, order=order)
    other = SCRFDDetector(create_session(path), "det.onnx")
    image = _scene(480, 640, [((40, 48, 80, 88), 0), ((224, 256, 384, 416), 2)])
    ours, theirs = controlled_detector.detect(image), other.detect(image)
    assert np.array_equal(ours.boxes, theirs.boxes) and np.array_equal(ours.keypoints, theirs.keypoints)
    assert len(ours) == 4

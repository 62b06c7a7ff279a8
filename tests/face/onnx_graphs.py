"""ONNX graphs with the released face models' signatures, built with onnx's helper at test time.

- ``scrfd_graph``: input ``input.1`` [1, 3, ?, ?] and 9 outputs (score, bbox, kps for strides 8, 16,
  32; 2 anchors per location) like det_10g.onnx. Each stride's head is one convolution with an
  s x s kernel and stride s (one output position per grid cell), so a test chooses what fires where:
  ``controlled_heads`` makes stride s look only at one colour channel and return fixed box and
  keypoint distances; ``random_heads`` gives random weights for comparisons with insightface.
  ``batched`` declares [1, N, C] outputs, ``order`` "kind" (scores, boxes, keypoints) or "stride".
- ``arcface_graph``: input [None, 3, 112, 112], one output [1, 512]: 8x8 average pooling then a
  fixed matrix, so the embedding of a crop is ``pool(blob) @ W`` by hand.

Not a test module (no ``test_`` prefix); tests/face and bench/face_analysis.py import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
ANCHORS = 2
OPSET = 13


@dataclass
class Head:
    """One stride's convolutions: weights [out, 3, s, s] and biases [out] for score (A), box (4A), kps (10A)."""

    score_w: np.ndarray
    score_b: np.ndarray
    box_w: np.ndarray
    box_b: np.ndarray
    kps_w: np.ndarray
    kps_b: np.ndarray


def controlled_heads(box_dist: dict[int, tuple[np.ndarray, np.ndarray]], kps_off: dict[int, np.ndarray],
                     gain: float = 10.0, level: float = 0.5, second_anchor: float = 1.0) -> dict[int, Head]:
    """Stride 8 looks at red, 16 at green, 32 at blue: anchor 0 scores ``sigmoid(gain * (mean - level))``
    of that channel over the cell (blob values, +-0.996 for 255/0), anchor 1 the same minus ``second_anchor``.
    ``box_dist[s]``: (anchor 0, anchor 1) distances in strides; ``kps_off[s]``: [2, 10] offsets in strides."""
    heads = {}
    for channel, s in enumerate(STRIDES):
        score_w = np.zeros((ANCHORS, 3, s, s), np.float32)
        score_w[:, channel] = gain / (s * s)
        score_b = np.array([-gain * level, -gain * level - second_anchor], np.float32)
        heads[s] = Head(score_w, score_b, np.zeros((4 * ANCHORS, 3, s, s), np.float32),
                        np.concatenate(box_dist[s]).astype(np.float32),
                        np.zeros((10 * ANCHORS, 3, s, s), np.float32), kps_off[s].reshape(-1).astype(np.float32))
    return heads


def random_heads(seed: int = 0, score_bias: float = -3.5) -> dict[int, Head]:
    """Random heads whose scores pass 0.5 at some dozens of anchors of a textured image."""
    rng = np.random.default_rng(seed)
    heads = {}
    for s in STRIDES:
        fan = 3 * s * s
        heads[s] = Head(rng.normal(0, 3.0 / np.sqrt(fan), (ANCHORS, 3, s, s)).astype(np.float32),
                        np.full(ANCHORS, score_bias, np.float32) + rng.normal(0, 0.5, ANCHORS).astype(np.float32),
                        rng.normal(0, 0.3 / np.sqrt(fan), (4 * ANCHORS, 3, s, s)).astype(np.float32),
                        rng.uniform(1.0, 3.0, 4 * ANCHORS).astype(np.float32),
                        rng.normal(0, 0.3 / np.sqrt(fan), (10 * ANCHORS, 3, s, s)).astype(np.float32),
                        rng.uniform(-1.5, 1.5, 10 * ANCHORS).astype(np.float32))
    return heads


def _conv_out(nodes, inits, x, name, w, b, s, width, batched, sigmoid=False):
    inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_conv"], kernel_shape=[s, s],
                                  strides=[s, s], name=f"Conv_{name}"))
    src = f"{name}_conv"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [src], [f"{name}_sig"], name=f"Sigmoid_{name}"))
        src = f"{name}_sig"
    nodes.append(helper.make_node("Transpose", [src], [f"{name}_t"], perm=[0, 2, 3, 1], name=f"Transpose_{name}"))
    shape = np.array([1, -1, width] if batched else [-1, width], np.int64)
    inits.append(numpy_helper.from_array(shape, f"{name}_shape"))
    nodes.append(helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name], name=f"Reshape_{name}"))


def scrfd_graph(path: Path, heads: dict[int, Head], batched: bool = False, order: str = "kind",
                keypoints: bool = True) -> Path:
    nodes: list = []
    inits: list = []
    kinds = [("score", 1), ("bbox", 4)] + ([("kps", 10)] if keypoints else [])
    for s in STRIDES:
        h = heads[s]
        _conv_out(nodes, inits, "input.1", f"score_{s}", h.score_w, h.score_b, s, 1, batched, sigmoid=True)
        _conv_out(nodes, inits, "input.1", f"bbox_{s}", h.box_w, h.box_b, s, 4, batched)
        if keypoints:
            _conv_out(nodes, inits, "input.1", f"kps_{s}", h.kps_w, h.kps_b, s, 10, batched)
    names = ([f"{k}_{s}" for k, _ in kinds for s in STRIDES] if order == "kind"
             else [f"{k}_{s}" for s in STRIDES for k, _ in kinds])
    widths = dict(kinds)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT,
                                             [1, f"n{n}", widths[n.split("_")[0]]] if batched
                                             else [f"n{n}", widths[n.split("_")[0]]]) for n in names]
    graph = helper.make_graph(nodes, "scrfd_test", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                                   [1, 3, "?", "?"])],
                              outputs, initializer=inits)
    return _save(graph, path)


def arcface_graph(path: Path, weight: np.ndarray, mxnet_norm: bool = False) -> Path:
    """``weight``: [3 * 14 * 14, 512]. ``mxnet_norm`` puts ``(x - 127.5) * 0.0078125`` nodes first (named as
    mxnet exports name them), which tells ArcFace to feed raw pixels."""
    nodes = []
    inits = [numpy_helper.from_array(weight.astype(np.float32), "fc_w")]
    x = "input.1"
    if mxnet_norm:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(0.0078125, np.float32), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["sub"], name="_minusscalar0"),
                  helper.make_node("Mul", ["sub", "scale"], ["mul"], name="_mulscalar0")]
        x = "mul"
    nodes += [helper.make_node("AveragePool", [x], ["pool"], kernel_shape=[8, 8], strides=[8, 8], name="AvgPool_0"),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="Flatten_0"),
              helper.make_node("MatMul", ["flat", "fc_w"], ["683"], name="MatMul_0")]
    graph = helper.make_graph(nodes, "arcface_test",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])], initializer=inits)
    return _save(graph, path)


def arcface_by_hand(crop: np.ndarray, weight: np.ndarray, mean: float = 127.5, std: float = 127.5) -> np.ndarray:
    """What ``arcface_graph`` computes for one 112x112x3 uint8 RGB crop."""
    blob = (crop.astype(np.float64) - mean) / std
    pooled = blob.transpose(2, 0, 1).reshape(3, 14, 8, 14, 8).mean(axis=(2, 4))
    return pooled.reshape(-1) @ weight.astype(np.float64)


def other_graph(path: Path, size: int, outputs: int = 1) -> Path:
    """A stand-in for the pack's landmark (192) or gender/age (96) model: neither detector nor recognizer."""
    nodes = [helper.make_node("GlobalAveragePool", ["data"], [f"out{i}"]) for i in range(outputs)]
    graph = helper.make_graph(nodes, "other", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                             [1, 3, size, size])],
                              [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, 3, 1, 1])
                               for i in range(outputs)])
    return _save(graph, path)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # onnxruntime 1.20 reads IR <= 10; 8 keeps older runtimes happy too
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path

"""Face analysis time per image on the CPU: SCRFD detection + ArcFace embedding through our code.

Question: how long does ``FaceAnalyzer.analyze`` (lib_adapters/face) take for one 640x640 image on
one CPU thread, with models of the released sizes? No weights are downloaded: the script builds,
with onnx's helper and seeded random weights, the two architectures of insightface's buffalo_l pack:

- det_10g: SCRFD-10GF with keypoints (insightface detection/scrfd/configs/scrfd/scrfd_10g_bnkps.py):
  ResNetV1e deep stem (3x3 convs 3-28-28-56, max pool), BasicBlock stages (3, 4, 2, 3) of widths
  (56, 88, 88, 224) with average-pool shortcuts, PAFPN to 56 channels on strides 8/16/32, and per
  stride 3 stacked 3x3 convs of 80 channels, then 3x3 score (2), box (8) and keypoint (20) convs;
  BatchNorms folded into the convs, as in the exported file. Input ``input.1`` [1, 3, ?, ?], the 9
  outputs ``score_8`` ... ``kps_32`` as [N, C].
- w600k_r50: ArcFace IResNet-50 (blocks 3, 4, 14, 3; widths 64-512; BN-conv-BN-PReLU-conv-BN
  blocks), BN, flatten, FC to 512, BN. Input [None, 3, 112, 112], output [1, 512].

Parameters and multiply-accumulates of both graphs are counted and written with the timings. The
detector's score convolutions get a bias that lets about 100 anchors pass the 0.5 threshold on the
bench image (random weights would give all or none), so NMS works on a realistic number of boxes.

Method: one process, onnxruntime with 1 intra-op thread, 3 warm-up analyses, then ``--repeats``
analyses of the same image, each timed with wall clock and process CPU time; the parts (the two
graph runs, our pre/post-processing) are timed the same way. Run from the repository root:

    .venv/bin/python bench/face_analysis.py            # -> bench/results/face_analysis_cpu.json
    .venv/bin/python bench/face_analysis.py --smoke    # 2 repeats, no file

Not a test module: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, whatever the working directory
from common import RESULTS, environment, load_avg, write_json  # noqa: E402

from lib_adapters.face import FaceAnalyzer, SessionOptions, face_models_root  # noqa: E402
from lib_adapters.face.align import align_face  # noqa: E402
from lib_adapters.face.scrfd import decode, letterbox, nms, to_blob  # noqa: E402

SIZE = 640


class Graph:
    """An ONNX graph under construction that tracks each tensor's (C, H, W) at a fixed input size to
    count parameters and multiply-accumulates."""

    def __init__(self, seed: int, height: int, width: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.params = 0
        self.macs = 0
        self._n = 0
        self.height, self.width = height, width

    def _name(self, kind: str) -> str:
        self._n += 1
        return f"{kind}_{self._n}"

    def _init(self, array: np.ndarray, kind: str) -> str:
        name = self._name(kind)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        self.params += array.size
        return name

    def shape_const(self, values: list[int]) -> str:
        name = self._name("shape")
        self.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, act: str | None = "relu",
             gain: float = 2.0, bias: np.ndarray | None = None) -> str:
        cin, h, w = self.shapes[x]
        weight = self.rng.normal(0, np.sqrt(gain / (cin * k * k)), (cout, cin, k, k))
        b = np.zeros(cout) if bias is None else bias
        out = self._name("conv")
        self.nodes.append(helper.make_node("Conv", [x, self._init(weight, "w"), self._init(b, "b")], [out],
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        self.shapes[out] = (cout, ho, wo)
        self.macs += cout * cin * k * k * ho * wo
        return self.act(out, act)

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        out = self._name(kind)
        if kind == "relu":
            self.nodes.append(helper.make_node("Relu", [x], [out]))
        else:  # prelu
            slope = np.full((self.shapes[x][0], 1, 1), 0.25)
            self.nodes.append(helper.make_node("PRelu", [x, self._init(slope, "slope")], [out]))
        self.shapes[out] = self.shapes[x]
        return out

    def bn(self, x: str) -> str:
        c = self.shapes[x][0]
        args = [self._init(np.ones(c), "g"), self._init(np.zeros(c), "beta"), self._init(np.zeros(c), "mean"),
                self._init(np.ones(c), "var")]
        out = self._name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [x, *args], [out], epsilon=1e-5))
        self.shapes[out] = self.shapes[x]
        return out

    def op(self, kind: str, inputs: list[str], shape: tuple[int, int, int], **attrs) -> str:
        out = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        self.shapes[out] = shape
        return out

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b], self.shapes[a])

    def upsample(self, x: str) -> str:
        c, h, w = self.shapes[x]
        scales = self._name("scales")
        self.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales))
        return self.op("Resize", [x, "", scales], (c, 2 * h, 2 * w), mode="nearest")

    def save(self, path: Path, inputs: list, outputs: list) -> Path:
        model = helper.make_model(helper.make_graph(self.nodes, path.stem, inputs, outputs, initializer=self.inits),
                                  opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path


def scrfd_10g_kps(path: Path, score_bias: float = 0.0, seed: int = 0) -> tuple[Path, Graph]:
    g = Graph(seed, SIZE, SIZE)
    g.shapes["input.1"] = (3, SIZE, SIZE)
    x = g.conv(g.conv(g.conv("input.1", 28, stride=2), 28), 56)
    c, h, w = g.shapes[x]
    x = g.op("MaxPool", [x], (c, (h + 1) // 2, (w + 1) // 2), kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    levels = []
    for blocks, width, stride in ((3, 56, 1), (4, 88, 2), (2, 88, 2), (3, 224, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            shortcut = x
            if s != 1 or g.shapes[x][0] != width:  # ResNetV1e: average pool, then a 1x1 conv
                cin, h, w = g.shapes[x]
                pooled = g.op("AveragePool", [x], (cin, h // s, w // s), kernel_shape=[s, s], strides=[s, s]) \
                    if s > 1 else x
                shortcut = g.conv(pooled, width, k=1, act=None)
            y = g.conv(g.conv(x, width, stride=s), width, act=None)
            x = g.act(g.add(y, shortcut), "relu")
        levels.append(x)
    lateral = [g.conv(level, 56, k=1, act=None) for level in levels[1:]]  # strides 8, 16, 32
    for i in (1, 0):  # top-down
        lateral[i] = g.add(lateral[i], g.upsample(lateral[i + 1]))
    inter = [g.conv(l, 56, act=None) for l in lateral]
    for i in (0, 1):  # bottom-up
        inter[i + 1] = g.add(inter[i + 1], g.conv(inter[i], 56, stride=2, act=None))
    feats = [inter[0]] + [g.conv(f, 56, act=None) for f in inter[1:]]
    outputs = {}
    for stride, feat in zip((8, 16, 32), feats):
        y = g.conv(g.conv(g.conv(feat, 80), 80), 80)
        score = g.conv(y, 2, act=None, gain=1e-4, bias=np.full(2, score_bias))
        score = g.op("Sigmoid", [score], g.shapes[score])
        for kind, conv_out, width in (("score", score, 1), ("bbox", g.conv(y, 8, act=None, gain=0.02), 4),
                                      ("kps", g.conv(y, 20, act=None, gain=0.02), 10)):
            t = g.op("Transpose", [conv_out], g.shapes[conv_out], perm=[0, 2, 3, 1])
            g.nodes.append(helper.make_node("Reshape", [t, g.shape_const([-1, width])], [f"{kind}_{stride}"]))
            outputs[f"{kind}_{stride}"] = width
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    g.save(path, [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
           [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"n{n}", outputs[n]]) for n in names])
    return path, g


def iresnet50(path: Path, seed: int = 1) -> tuple[Path, Graph]:
    g = Graph(seed, 112, 112)
    g.shapes["input.1"] = (3, 112, 112)
    x = g.bn(g.conv("input.1", 64, act=None))
    x = g.act(x, "prelu")
    for blocks, width in ((3, 64), (4, 128), (14, 256), (3, 512)):
        for i in range(blocks):
            s = 2 if i == 0 else 1
            shortcut = g.bn(g.conv(x, width, k=1, stride=s, act=None)) if i == 0 else x
            y = g.act(g.bn(g.conv(g.bn(x), width, act=None)), "prelu")
            y = g.bn(g.conv(y, width, stride=s, act=None))
            x = g.add(y, shortcut)
    x = g.bn(x)
    c, h, w = g.shapes[x]
    flat = g.op("Flatten", [x], (c * h * w, 1, 1), axis=1)
    fc_w = g._init(g.rng.normal(0, np.sqrt(1 / (c * h * w)), (c * h * w, 512)), "fc")
    fc_b = g._init(np.zeros(512), "fcb")
    g.macs += c * h * w * 512
    emb = g.op("Gemm", [flat, fc_w, fc_b], (512, 1, 1))
    args = [g._init(np.ones(512), "g"), g._init(np.zeros(512), "beta"), g._init(np.zeros(512), "mean"),
            g._init(np.ones(512), "var")]
    g.nodes.append(helper.make_node("BatchNormalization", [emb, *args], ["683"], epsilon=1e-5))
    g.save(path, [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
           [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])])
    return path, g


def bench_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


def calibrated_bias(path: Path, image: np.ndarray, target: int) -> float:
    """The score bias that lets about ``target`` anchors of ``image`` reach 0.5 (logits read back from
    the bias-0 graph's sigmoid outputs)."""
    from lib_adapters.face.runtime import create_session

    session = create_session(path, SessionOptions(threads=1))
    canvas, _ = letterbox(image, (SIZE, SIZE))
    names = [o.name for o in session.get_outputs() if o.name.startswith("score")]
    scores = np.concatenate([o.reshape(-1) for o in session.run(names, {"input.1": to_blob(canvas)})])
    scores = np.clip(scores.astype(np.float64), 1e-12, 1 - 1e-12)
    logits = np.log(scores / (1 - scores))
    return -float(np.sort(logits)[-target]) + 1e-6


def timed(fn, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_ms": [round(1000 * t, 3) for t in walls], "cpu_ms": [round(1000 * t, 3) for t in cpus],
            "median_wall_ms": round(1000 * statistics.median(walls), 3),
            "median_cpu_ms": round(1000 * statistics.median(cpus), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=100, help="anchors passing 0.5 on the bench image")
    parser.add_argument("--smoke", action="store_true", help="2 repeats, no result file")
    parser.add_argument("--out", type=Path, default=RESULTS / "face_analysis_cpu.json")
    args = parser.parse_args()
    repeats = 2 if args.smoke else args.repeats
    image = bench_image()
    with tempfile.TemporaryDirectory() as tmp:
        folder = face_models_root(tmp) / "buffalo_l"
        det_path, _ = scrfd_10g_kps(folder / "det_10g.onnx")
        bias = calibrated_bias(det_path, image, args.candidates)
        det_path, det = scrfd_10g_kps(folder / "det_10g.onnx", score_bias=bias)
        rec_path, rec = iresnet50(folder / "w600k_r50.onnx")
        analyzer = FaceAnalyzer.from_models_dir(tmp, "buffalo_l", SessionOptions(threads=1))
        canvas, _ = letterbox(image, (SIZE, SIZE))
        blob = to_blob(canvas)
        detector, recognizer = analyzer.detector, analyzer.recognizer
        outputs = detector.session.run(list(detector.spec.output_names), {"input.1": blob})
        candidates = decode(outputs, (SIZE, SIZE), detector.spec, 0.5)
        face = analyzer.analyze(image)
        crop = align_face(image, face.keypoints, 112)
        for _ in range(3):
            analyzer.analyze(image)
        parts = {
            "analyze (detect + pick + align + embed), the headline": timed(lambda: analyzer.analyze(image), repeats),
            "analyze with the 224 crop (FaceID Plus)": timed(lambda: analyzer.analyze(image, crop_size=224), repeats),
            "detector graph run": timed(lambda: detector.session.run(list(detector.spec.output_names),
                                                                     {"input.1": blob}), repeats),
            "recognizer graph run": timed(lambda: recognizer.embed([crop]), repeats),
            "letterbox + blob": timed(lambda: to_blob(letterbox(image, (SIZE, SIZE))[0]), repeats),
            "decode + NMS": timed(lambda: nms(*(lambda d: (d.boxes, d.scores))(
                decode(outputs, (SIZE, SIZE), detector.spec, 0.5)), 0.4), repeats),
            "align 112": timed(lambda: align_face(image, face.keypoints, 112), repeats),
        }
        sizes = {"det_10g.onnx": det_path.stat().st_size, "w600k_r50.onnx": rec_path.stat().st_size}
    headline = parts["analyze (detect + pick + align + embed), the headline"]
    result = {
        "question": "face analysis time per 640x640 image on one CPU thread (FaceAnalyzer.analyze)",
        "graphs": {"det_10g": {"params": det.params, "macs_at_640x640": det.macs, "file_bytes": sizes["det_10g.onnx"]},
                   "w600k_r50": {"params": rec.params, "macs_at_112x112": rec.macs,
                                 "file_bytes": sizes["w600k_r50.onnx"]}},
        "image": f"{SIZE}x{SIZE} RGB, smooth random texture", "threads": 1, "repeats": repeats,
        "candidates_over_threshold": len(candidates), "faces_after_nms": face.faces_found,
        "timings": parts, "load_average_after": load_avg(), "environment": environment_block(),
    }
    print(f"| CPU, 1 thread (`face_analysis.py`) | det_10g-sized SCRFD ({det.macs / 1e9:.1f} GMACs) + "
          f"w600k_r50-sized IResNet-50 ({rec.macs / 1e9:.2f} GMACs), random weights | {SIZE}x{SIZE} | "
          f"{headline['median_wall_ms']:.1f} ms wall, {headline['median_cpu_ms']:.1f} ms CPU (median of {repeats}) |")
    if not args.smoke:
        write_json(result, args.out)
    return 0


def environment_block() -> dict:
    import onnxruntime
    import torch

    env = environment(torch.device("cpu"))
    env["onnxruntime"] = onnxruntime.__version__
    env["onnx"] = onnx.__version__
    return env


if __name__ == "__main__":
    raise SystemExit(main())

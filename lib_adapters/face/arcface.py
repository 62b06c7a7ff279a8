"""ArcFace recognition (w600k_r50, glintr100): aligned 112x112 face -> 512-d identity embedding.

Input normalisation follows insightface's ``ArcFaceONNX``: graphs converted from mxnet carry their
own normalisation as ``Sub``/``Mul`` nodes among the first eight (names starting with
``Sub``/``_minus`` and ``Mul``/``_mul``), and are fed raw pixels (mean 0, std 1); every other graph
(both released packs) is fed ``(x - 127.5) / 127.5``. Pixels go in RGB, NCHW float32. The
embedding is the graph's output, flattened; FaceID uses its L2-normalised form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import FormatError
from .onnx_info import GraphInfo, NodeInfo


@dataclass(frozen=True)
class Normalisation:
    mean: float
    std: float


def normalisation_from_nodes(nodes: Sequence[NodeInfo]) -> Normalisation:
    first = nodes[:8]
    has_sub = any(n.name.startswith(("Sub", "_minus")) for n in first)
    has_mul = any(n.name.startswith(("Mul", "_mul")) for n in first)
    return Normalisation(0.0, 1.0) if has_sub and has_mul else Normalisation(127.5, 127.5)


def l2_normalise(embedding: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(embedding))
    if not np.isfinite(norm) or norm == 0.0:
        raise FormatError("the face recognizer returned an all-zero or non-finite embedding; its file is damaged.")
    return (embedding / norm).astype(np.float32)


class ArcFaceRecognizer:
    """An ArcFace graph in an onnxruntime session."""

    def __init__(self, session: Any, graph: GraphInfo, source: str = "the recognizer"):
        first = session.get_inputs()[0]
        outputs = session.get_outputs()
        if len(outputs) != 1:
            raise FormatError(f"{source}: an ArcFace recognizer has one output, this graph has {len(outputs)}.")
        self.session = session
        self.input_name = first.name
        self.output_name = outputs[0].name
        self.size = int(first.shape[2]) if isinstance(first.shape[2], int) else 112
        self.normalisation = normalisation_from_nodes(graph.first_nodes)

    def blob(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned crops (size x size x 3 uint8 RGB) -> N x 3 x size x size float32."""
        norm = self.normalisation
        stack = np.stack([np.asarray(f, dtype=np.float32) for f in faces])
        return ((stack - np.float32(norm.mean)) / np.float32(norm.std)).transpose(0, 3, 1, 2).copy()

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """[N, 512] float32 raw embeddings of aligned crops (one graph call per crop: the released
        graphs declare a batch of 1 on their output)."""
        rows = [self.session.run([self.output_name], {self.input_name: self.blob([face])})[0].reshape(-1)
                for face in faces]
        return np.stack(rows).astype(np.float32)

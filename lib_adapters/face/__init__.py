"""Face analysis for IP-Adapter FaceID on onnxruntime, without the insightface package.

insightface's released ONNX models (the ``buffalo_l`` or ``antelopev2`` pack, which the user puts in
``<models>/insightface/models/<pack>/``) are run by onnxruntime; everything around them is ours:

- ``discovery``: which file is the detector and which the recognizer, read off their graphs
  (``onnx_info`` reads the graph signature straight from the file, without the ``onnx`` package);
- ``scrfd``: SCRFD pre-processing, anchor decoding, NMS;
- ``align``: the 5-point similarity alignment onto ArcFace's template (112 and 224 crops);
- ``arcface``: the recognizer's input normalisation and the embedding;
- ``analysis``: ``FaceAnalyzer`` (detect, pick, align, embed) and its ``FaceResult``;
- ``runtime``: onnxruntime sessions on the CPU or CUDA.

Nothing here imports torch: the result is numpy, the FaceID projections take it from there.
"""
from __future__ import annotations

from .analysis import FACEID_PLUS_CROP, DetectorSettings, FaceAnalyzer, FaceResult, NoFaceError, pick_face
from .discovery import DEFAULT_PACK, FaceModelFiles, available_packs, face_models_root, find_face_models
from .runtime import FaceDevice, SessionOptions

__all__ = ["FACEID_PLUS_CROP", "DEFAULT_PACK", "DetectorSettings", "FaceAnalyzer", "FaceDevice", "FaceModelFiles",
           "FaceResult", "NoFaceError", "SessionOptions", "available_packs", "face_models_root", "find_face_models",
           "pick_face"]

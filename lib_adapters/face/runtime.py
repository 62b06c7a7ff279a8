"""onnxruntime sessions for the face models: the CPU by default, CUDA when asked for and present.

onnxruntime is imported when a session is made, never at import time: the extension loads without
it, and only a face unit needs it. The WebUI wants ``onnxruntime-gpu`` where it runs on CUDA and
``onnxruntime`` elsewhere (both provide the ``onnxruntime`` module).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import MissingFileError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class FaceDevice(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"  # falls back to the CPU when onnxruntime has no CUDA provider


@dataclass(frozen=True)
class SessionOptions:
    device: FaceDevice = FaceDevice.CPU
    threads: int = 0  # intra-op threads; 0 lets onnxruntime choose


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingFileError(
            "Face analysis needs the onnxruntime package, which is not installed. Install it into the WebUI's "
            "Python: `pip install onnxruntime` (or `pip install onnxruntime-gpu` on an NVIDIA GPU), then restart "
            "the WebUI.") from exc
    return onnxruntime


def providers_for(device: FaceDevice, available: list[str]) -> list[str]:
    """CUDA first (then the CPU for the ops it lacks) when asked for and present, else the CPU only."""
    if device is FaceDevice.CUDA and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def create_session(path: str | Path, options: SessionOptions = SessionOptions()) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` on the providers ``options`` ask for."""
    ort = import_onnxruntime()
    settings = ort.SessionOptions()
    settings.log_severity_level = 3  # errors only: the released graphs warn about unused initializers
    if options.threads > 0:
        settings.intra_op_num_threads = options.threads
        settings.inter_op_num_threads = 1
    providers = providers_for(options.device, list(ort.get_available_providers()))
    return ort.InferenceSession(str(path), sess_options=settings, providers=providers)

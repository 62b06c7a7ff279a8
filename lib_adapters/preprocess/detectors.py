"""Weight-needing detectors from controlnet-aux, built from a local folder only.

Each ``DetectorSpec`` names the exact files the network needs (the names controlnet-aux's own
``from_pretrained`` opens in a local folder) and a builder. The builders construct the network
classes themselves and feed them state dicts read by ``loading.load_checkpoint`` (weights only),
instead of calling ``from_pretrained``: that keeps unsafe unpickling and every download path out
of reach, and lets e.g. body-only OpenPose work without the hand and face files.

controlnet-aux is imported inside the builders only: importing it loads every detector module
(seconds), which must not happen when the WebUI merely imports this package.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import FormatError
from .loading import load_checkpoint, load_state_dict, strip_prefix
from .spec import DetectorSpec, RunParams

logger = logging.getLogger(__name__)

_ANNOTATORS = "the lllyasviel/Annotators repository on Hugging Face"
_ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main"


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Importing controlnet-aux warns about optional packages we never use (mediapipe, timm
    registry clashes); in the WebUI console that reads like an error, so silence the import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _ready(net: Any, device: str) -> Any:
    """Inference mode on the requested device; detectors read their device off the parameters."""
    net.eval()
    return net.to(device)


# ---------------------------------------------------------------------------------------------
# Builders: (paths of the spec's files, in order, device) -> detector
# ---------------------------------------------------------------------------------------------

def _build_hed(paths: tuple[Path, ...], device: str) -> Any:
    with _quiet_import():
        from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    (path,) = paths
    net = ControlNetHED_Apache2()
    load_state_dict(net, load_checkpoint(path), path)
    return HEDdetector(_ready(net.float(), device))


def _build_pidinet(paths: tuple[Path, ...], device: str) -> Any:
    with _quiet_import():
        from controlnet_aux.pidi import PidiNetDetector
        from controlnet_aux.pidi.model import pidinet

    (path,) = paths
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise FormatError(f"{path} has no 'state_dict' entry; it is not the PiDiNet checkpoint.")
    net = pidinet()
    # The released file was saved from DataParallel, hence the "module." prefix.
    load_state_dict(net, strip_prefix(checkpoint["state_dict"], "module."), path)
    return PidiNetDetector(_ready(net, device))


def _build_lineart(paths: tuple[Path, ...], device: str) -> Any:
    with _quiet_import():
        from controlnet_aux.lineart import Generator, LineartDetector

    (path,) = paths
    net = Generator(3, 1, 3)
    load_state_dict(net, load_checkpoint(path), path)
    net = _ready(net, device)
    # The detector holds a fine and a coarse model and each preprocessor uses one of them, so the
    # same network fills both slots and only one file is needed.
    return LineartDetector(net, net)


def _build_lineart_anime(paths: tuple[Path, ...], device: str) -> Any:
    import functools

    import torch.nn as nn

    with _quiet_import():
        from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator

    (path,) = paths
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    load_state_dict(net, strip_prefix(load_checkpoint(path), "module."), path)
    return LineartAnimeDetector(_ready(net, device))


def _build_midas(paths: tuple[Path, ...], device: str) -> Any:
    with _quiet_import():
        from controlnet_aux.midas import MidasDetector
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    (path,) = paths
    checkpoint = load_checkpoint(path)
    if isinstance(checkpoint, dict) and "optimizer" in checkpoint:  # a training snapshot
        checkpoint = checkpoint["model"]
    # DPT-Hybrid as controlnet-aux builds it; path=None so the class does not torch.load itself.
    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    load_state_dict(net, checkpoint, path)
    # MidasDetector only calls the model and reads its parameters' device, so the bare network
    # stands in for controlnet-aux's MiDaSInference wrapper (whose constructor would load by path).
    return MidasDetector(_ready(net, device))


def _build_zoe(paths: tuple[Path, ...], device: str) -> Any:
    with _quiet_import():
        from controlnet_aux.zoe import ZoeDetector
        from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth
        from controlnet_aux.zoe.zoedepth.utils.config import get_config

    (path,) = paths
    checkpoint = load_checkpoint(path)
    is_snapshot = isinstance(checkpoint, dict) and "model" in checkpoint
    state = checkpoint["model"] if is_snapshot else checkpoint
    net = ZoeDepth.build_from_config(get_config("zoedepth", "infer"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        # Newer timm versions rename or drop a few BEiT buffers (relative position indices); the
        # learned weights still match, so load what fits, as controlnet-aux does, but say so.
        result = net.load_state_dict(state, strict=False)
        logger.warning(
            "ZoeDepth weights %s loaded non-strictly (%d missing, %d unexpected keys); this is "
            "expected with some timm versions.",
            path, len(result.missing_keys), len(result.unexpected_keys),
        )
    return ZoeDetector(_ready(net, device))


def _build_openpose(paths: tuple[Path, ...], device: str) -> Any:
    """Body only (one file), or body + hand + face (three files, in that order)."""
    with _quiet_import():
        from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector

    estimators = []
    for path, cls in zip(paths, (Body, Hand, Face)):
        # These classes torch.load the path themselves (unrestricted in torch 2.1); the
        # weights-only read first guarantees the file holds tensors and nothing else.
        load_checkpoint(path)
        try:
            estimators.append(cls(str(path)).to(device))
        except (KeyError, RuntimeError) as exc:
            raise FormatError(
                f"The weights file {path} does not fit the OpenPose {cls.__name__} network "
                f"({type(exc).__name__}: {str(exc)[:200]}). Check that the right file is in "
                f"place under this exact name."
            ) from None
    return OpenposeDetector(*estimators)


def _annotators(key: str, build: Callable[[tuple[Path, ...], str], Any], *files: str) -> DetectorSpec:
    return DetectorSpec(key, files, _ANNOTATORS, _ANNOTATORS_URL, build)


# File names are the ones controlnet-aux's from_pretrained opens in a local folder.
HED = _annotators("hed", _build_hed, "ControlNetHED.pth")
PIDINET = _annotators("pidinet", _build_pidinet, "table5_pidinet.pth")
LINEART = _annotators("lineart", _build_lineart, "sk_model.pth")
LINEART_COARSE = _annotators("lineart_coarse", _build_lineart, "sk_model2.pth")
LINEART_ANIME = _annotators("lineart_anime", _build_lineart_anime, "netG.pth")
MIDAS = _annotators("midas", _build_midas, "dpt_hybrid-midas-501f0c75.pt")
ZOE = _annotators("zoe", _build_zoe, "ZoeD_M12_N.pt")
OPENPOSE = _annotators("openpose", _build_openpose, "body_pose_model.pth")
OPENPOSE_FULL = _annotators(
    "openpose_full", _build_openpose, "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
)


# ---------------------------------------------------------------------------------------------
# Run functions: (image, detector, params) -> map
# ---------------------------------------------------------------------------------------------

def _detect(detector: Any, image: np.ndarray, params: RunParams, **options: Any) -> np.ndarray:
    """Call a controlnet-aux detector at the working resolution, numpy in and out, no autograd."""
    import torch

    with torch.no_grad():
        return detector(
            image,
            detect_resolution=params.resolution,
            image_resolution=params.resolution,
            output_type="np",
            **options,
        )


def run_hed(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Soft HED edges (grey levels kept)."""
    return _detect(detector, image, params, safe=False, scribble=False)


def run_scribble_hed(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """HED edges thinned and binarised into scribble-like strokes."""
    return _detect(detector, image, params, safe=True, scribble=True)


def run_sketch_pidinet(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """PiDiNet edges thresholded at 0.5: the binary sketch the T2I sketch adapter was trained on."""
    return _detect(detector, image, params, safe=True, apply_filter=True)


def run_scribble_pidinet(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """PiDiNet edges thinned and binarised into scribble-like strokes."""
    return _detect(detector, image, params, safe=True, scribble=True)


def run_lineart(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Realistic line art, white lines on black."""
    return _detect(detector, image, params, coarse=False)


def run_lineart_coarse(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Coarse line art (the second, bolder model), white lines on black."""
    return _detect(detector, image, params, coarse=True)


def run_plain(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Detectors with no options of their own (anime line art, MiDaS, ZoeDepth)."""
    return _detect(detector, image, params)


def run_openpose(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Body skeleton only."""
    return _detect(detector, image, params, include_body=True, include_hand=False, include_face=False)


def run_openpose_full(image: np.ndarray, detector: Any, params: RunParams) -> np.ndarray:
    """Body, hands and face."""
    return _detect(detector, image, params, include_body=True, include_hand=True, include_face=True)

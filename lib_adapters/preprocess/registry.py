"""The preprocessor table and the one entry point that runs a preprocessor.

The table is built once at import into read-only containers (a tuple and a MappingProxyType);
nothing registers itself at run time. Loaded detectors live in a ``PreprocessorCache`` that the
caller owns (one per WebUI session or per API worker), never in a module global.
"""
from __future__ import annotations

import numbers
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import AdapterError, InputError
from . import detectors as det
from . import simple
from .face import run_face
from .loading import build_detector
from .resize import resize_exact, short_side_size, to_hwc_uint8
from .spec import RESOLUTION_MAX, RESOLUTION_MIN, Preprocessor, RunParams, SliderSpec

_SPATIAL = ("depth", "openpose", "sketch", "canny", "seg", "color")

_PREPROCESSORS: tuple[Preprocessor, ...] = (
    Preprocessor(
        "none", "None (the image is the hint)", simple.run_none, resolution=None,
        suggested_for=_SPATIAL + ("style",),
    ),
    Preprocessor(
        "invert", "Invert (white background to black)", simple.run_invert, resolution=None,
        suggested_for=("sketch", "canny"),
    ),
    Preprocessor(
        "canny", "Canny edges", simple.run_canny,
        threshold_a=SliderSpec("Canny low threshold", 1, 255, 100, 1),
        threshold_b=SliderSpec("Canny high threshold", 1, 255, 200, 1),
        suggested_for=("canny", "sketch"),
    ),
    Preprocessor(
        "threshold", "Threshold (binary)", simple.run_threshold,
        threshold_a=SliderSpec("Binarization threshold", 0, 255, 127, 1),
        suggested_for=("sketch",),
    ),
    Preprocessor("color_grid", "Colour grid", simple.run_color_grid, suggested_for=("color",)),
    # FaceID units read faces themselves; this preprocessor is their preview (box, keypoints, aligned crop).
    # Its detector is the unit's face finder, which the caller passes in (``run_preprocessor(detector=...)``).
    Preprocessor("face", "Face (FaceID: box, keypoints, aligned crop)", run_face, resolution=None),
    Preprocessor(
        "depth_midas", "Depth (MiDaS DPT-Hybrid)", det.run_plain, suggested_for=("depth",),
        detector=det.MIDAS,
    ),
    Preprocessor(
        "depth_zoe", "Depth (ZoeDepth)", det.run_plain, suggested_for=("depth",), detector=det.ZOE,
    ),
    Preprocessor(
        "openpose", "OpenPose (body)", det.run_openpose, suggested_for=("openpose",),
        detector=det.OPENPOSE,
    ),
    Preprocessor(
        "openpose_full", "OpenPose (body, hands, face)", det.run_openpose_full,
        suggested_for=("openpose",), detector=det.OPENPOSE_FULL,
    ),
    Preprocessor(
        "sketch_pidinet", "Sketch (PiDiNet)", det.run_sketch_pidinet, suggested_for=("sketch",),
        detector=det.PIDINET,
    ),
    Preprocessor(
        "scribble_pidinet", "Scribble (PiDiNet)", det.run_scribble_pidinet,
        suggested_for=("sketch",), detector=det.PIDINET,
    ),
    Preprocessor("hed", "Soft edges (HED)", det.run_hed, suggested_for=("sketch",), detector=det.HED),
    Preprocessor(
        "scribble_hed", "Scribble (HED)", det.run_scribble_hed, suggested_for=("sketch",),
        detector=det.HED,
    ),
    Preprocessor(
        "lineart", "Line art (realistic)", det.run_lineart, suggested_for=("sketch",),
        detector=det.LINEART,
    ),
    Preprocessor(
        "lineart_coarse", "Line art (coarse)", det.run_lineart_coarse, suggested_for=("sketch",),
        detector=det.LINEART_COARSE,
    ),
    Preprocessor(
        "lineart_anime", "Line art (anime)", det.run_plain, suggested_for=("sketch",),
        detector=det.LINEART_ANIME,
    ),
)

_BY_NAME: Mapping[str, Preprocessor] = MappingProxyType({p.name: p for p in _PREPROCESSORS})
if len(_BY_NAME) != len(_PREPROCESSORS):  # a duplicated id would silently shadow an entry
    raise RuntimeError("duplicate preprocessor names in the table")

# sd-webui-controlnet module names, so API clients and pasted infotext written for it still work.
_ALIASES: Mapping[str, str] = MappingProxyType({
    "invert (from white bg & black line)": "invert",
    "binary": "threshold",
    "t2ia_color_grid": "color_grid",
    "color": "color_grid",
    "depth": "depth_midas",
    "t2ia_sketch_pidi": "sketch_pidinet",
    "pidinet_sketch": "sketch_pidinet",
    "softedge_hed": "hed",
    "lineart_realistic": "lineart",
})


def list_preprocessors() -> tuple[Preprocessor, ...]:
    """Every preprocessor, in display order."""
    return _PREPROCESSORS


def get_preprocessor(name: str) -> Preprocessor:
    """The preprocessor with this id (or sd-webui-controlnet alias); InputError if unknown."""
    found = None
    if isinstance(name, str):
        key = name.strip()
        folded = key.casefold()
        found = _BY_NAME.get(key) or _BY_NAME.get(folded) or _BY_NAME.get(_ALIASES.get(folded, ""))
    if found is None:
        raise InputError(f"Unknown preprocessor {name!r}. Valid names: {', '.join(_BY_NAME)}.")
    return found


class PreprocessorCache:
    """Loaded detectors, keyed by (detector, weights folder), for the lifetime the caller chooses.

    Preprocessors that share a network (e.g. ``hed`` and ``scribble_hed``) share one entry.
    Thread-safe: the WebUI may run the preview button and a generation at the same time.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._detectors: dict[tuple[str, Path], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, weights_dir: Optional[Path]) -> Any:
        """The loaded detector behind preprocessor ``name`` (None if it needs no weights)."""
        preprocessor = get_preprocessor(name)
        spec = preprocessor.detector
        if spec is None:
            return None
        if weights_dir is None:  # let the loader raise its explanatory MissingFileError
            return build_detector(spec, None, preprocessor.name, self.device)
        key = (spec.key, Path(weights_dir).expanduser().resolve())
        with self._lock:
            if key not in self._detectors:
                self._detectors[key] = build_detector(spec, key[1], preprocessor.name, self.device)
            return self._detectors[key]

    def clear(self) -> None:
        """Drop every loaded detector (e.g. on model unload or when the folder setting changes)."""
        with self._lock:
            self._detectors.clear()

    def __len__(self) -> int:
        return len(self._detectors)


def _is_number(value: Any) -> bool:
    # numbers.Real covers numpy scalars from gradio/numpy callers; a bool is never a slider value.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _resolve_resolution(preprocessor: Preprocessor, value: Optional[float]) -> Optional[int]:
    if preprocessor.resolution is None:
        return None  # works at the input size; a resolution from the UI is irrelevant
    # None, or the -1 that sd-webui-controlnet API clients send, means "the default".
    if value is None or (_is_number(value) and value < 0):
        return preprocessor.resolution
    if not _is_number(value) or value != int(value):
        raise InputError(f"Preprocessor resolution must be a whole number, got {value!r}.")
    if not RESOLUTION_MIN <= value <= RESOLUTION_MAX:
        raise InputError(
            f"Preprocessor resolution {int(value)} is outside {RESOLUTION_MIN}..{RESOLUTION_MAX}."
        )
    return int(value)


def _resolve_threshold(spec: Optional[SliderSpec], value: Optional[float], name: str) -> Optional[float]:
    if spec is None:
        return None
    # -1 is sd-webui-controlnet's "default" marker; honoured only where it cannot be a real value.
    if value is None or (value == -1 and spec.minimum > -1):
        return float(spec.default)
    if not _is_number(value):
        raise InputError(f"{spec.label} must be a number, got {value!r}.")
    if not spec.minimum <= value <= spec.maximum:
        raise InputError(f"{spec.label} ({name}) = {value} is outside {spec.minimum}..{spec.maximum}.")
    return float(value)


def run_preprocessor(
    name: str,
    image: Any,
    *,
    resolution: Optional[int] = None,
    threshold_a: Optional[float] = None,
    threshold_b: Optional[float] = None,
    weights_dir: Optional[Path] = None,
    cache: Optional[PreprocessorCache] = None,
    detector: Any = None,
) -> np.ndarray:
    """Run preprocessor ``name`` on ``image`` and return an H x W x 3 uint8 RGB map.

    ``image`` is anything ``to_hwc_uint8`` accepts. The output keeps the input's aspect ratio; its
    short side equals the resolution (default per preprocessor), except for preprocessors whose
    ``resolution`` is None, which keep the input size. Weight-needing preprocessors load their files
    from ``weights_dir`` only, through ``cache`` when given (else a load for this call only).
    ``detector`` is for preprocessors without a weights spec whose detector the caller builds (``face``:
    the unit's face finder).

    Raises InputError (unknown name, bad image, out-of-range parameter), MissingFileError (a
    weight file is not in ``weights_dir``), FormatError (a weight file is unreadable) and
    AdapterError (the detector failed while running).
    """
    preprocessor = get_preprocessor(name)
    params = RunParams(
        resolution=_resolve_resolution(preprocessor, resolution),
        threshold_a=_resolve_threshold(preprocessor.threshold_a, threshold_a, "threshold_a"),
        threshold_b=_resolve_threshold(preprocessor.threshold_b, threshold_b, "threshold_b"),
    )
    source = to_hwc_uint8(image)
    if preprocessor.detector is not None:
        if cache is not None:
            detector = cache.get(preprocessor.name, weights_dir)
        else:
            detector = build_detector(preprocessor.detector, weights_dir, preprocessor.name, "cpu")
        try:
            result = preprocessor.run(source, detector, params)
        except AdapterError:
            raise
        except Exception as exc:  # a detector bug or OOM must fail this unit, not the generation
            raise AdapterError(
                f"Preprocessor {preprocessor.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        result = preprocessor.run(source, detector, params)

    result = to_hwc_uint8(result)
    if params.resolution is None:
        return result
    # Detectors round their working size to multiples of 64; give callers the exact size instead.
    height, width = short_side_size(source.shape[0], source.shape[1], params.resolution)
    return resize_exact(result, width, height)

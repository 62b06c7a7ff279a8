"""Control-image preprocessing: resize modes, input normalisation and the preprocessor table.

Importing this package is cheap: detectors (controlnet-aux) are imported only when one runs.
"""
from __future__ import annotations

from .registry import PreprocessorCache, get_preprocessor, list_preprocessors, run_preprocessor
from .resize import ResizeMode, fit_image, to_hwc_uint8
from .spec import CONDITION_KINDS, DetectorSpec, Preprocessor, SliderSpec

__all__ = [
    "CONDITION_KINDS",
    "DetectorSpec",
    "Preprocessor",
    "PreprocessorCache",
    "ResizeMode",
    "SliderSpec",
    "fit_image",
    "get_preprocessor",
    "list_preprocessors",
    "run_preprocessor",
    "to_hwc_uint8",
]

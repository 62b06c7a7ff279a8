"""The frozen records that describe preprocessors and the detectors behind them.

Kept apart from the table itself (``registry.py``) so the modules that implement preprocessors
(``simple.py``, ``detectors.py``) can use these types without importing the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# The adapter condition kinds a preprocessor can be suggested for (T2I-Adapter families plus the
# style/IP inputs that take the raw image).
CONDITION_KINDS: tuple[str, ...] = ("depth", "openpose", "sketch", "canny", "seg", "color", "style")

# Preprocessor resolution limits: below 64 detectors return garbage, above 2048 they run for
# minutes on CPU and exhaust VRAM on small GPUs.
RESOLUTION_MIN = 64
RESOLUTION_MAX = 2048


@dataclass(frozen=True)
class SliderSpec:
    """One numeric preprocessor parameter as the UI shows it (and the API validates it)."""

    label: str
    minimum: float
    maximum: float
    default: float
    step: float

    def __post_init__(self) -> None:
        if not self.minimum <= self.default <= self.maximum:
            raise ValueError(f"slider {self.label!r}: default outside [minimum, maximum]")


@dataclass(frozen=True)
class RunParams:
    """The resolved arguments of one preprocessor run (defaults already applied, ranges checked).

    ``resolution`` is None only for preprocessors that work at the input size.
    """

    resolution: Optional[int]
    threshold_a: Optional[float]
    threshold_b: Optional[float]


@dataclass(frozen=True)
class DetectorSpec:
    """A weight-needing detector: which files it needs and how to build it from a local folder.

    ``build(paths, device)`` gets the full paths of ``files`` in the same order, only once every
    one of them exists; it returns the ready detector object.
    """

    key: str
    files: tuple[str, ...]
    source: str  # human-readable origin, e.g. "the lllyasviel/Annotators repository on Hugging Face"
    source_url: str  # folder URL the files can be fetched from by hand
    build: Callable[[tuple[Path, ...], str], Any]


# A preprocessor's work: (HWC uint8 RGB image, detector or None, resolved params) -> map.
RunFn = Callable[[np.ndarray, Any, RunParams], np.ndarray]


@dataclass(frozen=True)
class Preprocessor:
    """One entry of the preprocessor table.

    ``name`` is the stable id used in the API and in infotext; ``label`` is for the UI.
    ``resolution`` is the default working resolution (short side of the output), or None when the
    preprocessor works at the input size and the UI should hide the resolution slider.
    """

    name: str
    label: str
    run: RunFn
    resolution: Optional[int] = 512
    threshold_a: Optional[SliderSpec] = None
    threshold_b: Optional[SliderSpec] = None
    suggested_for: tuple[str, ...] = ()
    detector: Optional[DetectorSpec] = None

    def __post_init__(self) -> None:
        unknown = set(self.suggested_for) - set(CONDITION_KINDS)
        if unknown:
            raise ValueError(f"preprocessor {self.name!r}: unknown condition kinds {unknown}")

    @property
    def needs_weights(self) -> bool:
        """True when the preprocessor loads weight files from the annotator folder."""
        return self.detector is not None

    @property
    def weight_files(self) -> tuple[str, ...]:
        """The exact file names that must be present in the annotator folder."""
        return self.detector.files if self.detector is not None else ()

"""What a run reports while it trains: ``Progress`` per optimizer step, the ``TrainCallbacks`` a front end implements
(progress, interrupt polling, checkpoints, samples, warnings), and ``format_duration``, the one way every front end
writes a time span (the WebUI's progress bar style: ``45s``, ``03:07``, ``01:02:03``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done
    total: int
    loss: float
    lr: float
    epoch: int
    elapsed: float  # seconds in this session
    eta: float  # seconds left, extrapolated from this session's pace


class TrainCallbacks:
    """Hooks for a UI; every method has a no-op default. ``interrupted()`` is polled before each step."""

    def on_progress(self, progress: Progress) -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_sample(self, step: int, images: list[Image.Image], paths: list[Path]) -> None:
        pass

    def on_warning(self, message: str) -> None:
        """Something the user should know that does not stop the run (e.g. a caption was capped)."""
        log.warning(message)


def format_duration(seconds: float | None) -> str:
    """Like the WebUI's progress bar: ``45s``, ``03:07``, ``01:02:03``; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if seconds >= 60:
        return f"{seconds // 60:02d}:{seconds % 60:02d}"
    return f"{seconds}s"

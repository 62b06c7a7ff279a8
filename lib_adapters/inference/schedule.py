"""When and how strongly a unit acts: the sampling window and per-level scales."""
from __future__ import annotations

from .units import ControlMode

# sd-webui-controlnet's "soft injection" for T2I-Adapters: shallow levels weaker than deep ones,
# used by both non-balanced modes so the prompt keeps more say over fine detail.
SOFT_LEVEL_SCALES = (0.25, 0.62, 0.825, 1.0)


def level_scales(weight: float, mode: ControlMode, levels: int = 4) -> tuple[float, ...]:
    if mode is ControlMode.BALANCED:
        return (weight,) * levels
    return tuple(weight * s for s in SOFT_LEVEL_SCALES[:levels])


def in_window(progress: float | None, start: float, end: float) -> bool:
    """``progress`` is the fraction of sampling done (step / total steps); None means unknown (always on)."""
    if progress is None:
        return True
    return start <= progress <= end


def cond_rows_only(mode: ControlMode) -> bool:
    """'Adapter is more important': uncond rows get nothing, so CFG amplifies the adapter."""
    return mode is ControlMode.ADAPTER

"""The extension's one exception hierarchy.

Every error a user can cause (a bad file, a missing encoder, a wrong-architecture model, a bad API
request) is an ``AdapterError`` whose message says what was expected, what was found and what to
do. The WebUI glue catches ``AdapterError`` per unit, shows it, and lets the generation go on.
"""
from __future__ import annotations


class AdapterError(Exception):
    """Base class: a problem the user can fix, described in words they can act on."""


class FormatError(AdapterError):
    """A model file is unreadable, truncated, of an unknown family, or has unexpected keys."""


class IncompatibleModelError(AdapterError):
    """A model file is fine but does not fit the loaded checkpoint (e.g. an SDXL adapter on SD1.5)."""


class MissingFileError(AdapterError):
    """A file the user must provide (model, encoder, preprocessor weights, image) is not there."""


class InputError(AdapterError):
    """A unit's settings or an API request are malformed (bad image, out-of-range value, ...)."""


class UnsupportedModelError(AdapterError):
    """A recognised model family that cannot be used where it was given (e.g. a ControlNet in the Adapters panel)."""


class DiskFullError(AdapterError):
    """A file could not be written because its disk is full (or the user's quota is used up)."""

    def __init__(self, path, free: int | None):
        self.path, self.free = path, free
        left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        super().__init__(f"the disk is full: {path} could not be written ({left} on that disk). Free some space "
                         "or write to another disk, then start again")

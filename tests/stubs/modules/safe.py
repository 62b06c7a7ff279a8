"""Fake of ``modules/safe.py``: the restricted checkpoint loader.

The real module replaces ``torch.load`` globally with a restricted unpickler (``safe.load``) unless
``--disable-safe-unpickle``. The stub does NOT patch ``torch.load`` (that would leak into unrelated
tests); ``load`` stands in for the restricted loader with ``torch.load(weights_only=True)`` and
``unsafe_torch_load`` is the original ``torch.load``.
"""
from __future__ import annotations

import torch

unsafe_torch_load = torch.load


def load(filename, *args, **kwargs):
    """Restricted load: tensors and plain containers only."""
    kwargs.setdefault("weights_only", True)
    return unsafe_torch_load(filename, *args, **kwargs)


def load_with_extra(filename, extra_handler=None, *args, **kwargs):
    return load(filename, *args, **kwargs)


class Extra:
    """Context manager that lets extra globals through the unpickler; a no-op here."""

    def __init__(self, handler):
        self.handler = handler

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        return None

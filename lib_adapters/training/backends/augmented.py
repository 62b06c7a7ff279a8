"""Augmented assignments on tensors (``x += n``) computed out of place while a host's UNet is trained through.

Forge (main ``backend/nn/unet.py``, Classic ``ldm_patched``: both ComfyUI-derived) writes the residuals of its
transformer blocks as ``x += n``, in place, after ``norm1(x)``/``norm2(x)`` saved ``x`` for backward. At inference
that saves memory; under autograd the backward then finds a saved tensor modified ("one of the variables needed
for gradient computation has been modified by an inplace operation", seen in the real Forge main at the first
LoRA step). ldm (A1111) and diffusers write ``x = x + n`` and are unaffected.

``out_of_place_augmented()`` is a ``TorchFunctionMode`` that turns an in-place tensor operator reached from an
augmented assignment (``+=``, ``-=``, ``*=``, ``/=``: the caller's current bytecode instruction is
``INPLACE_*`` on Python 3.10, ``BINARY_OP`` ``+=`` etc. on 3.11+) into its out-of-place form. An augmented
assignment rebinds its target to the operator's result, so ``x += n`` then means ``x = x + n``: the same values,
and the saved ``x`` is left alone. Explicit ``x.add_(n)`` calls, whose result may be discarded, stay in place, as
does everything while gradients are off. Its cost is one Python call per torch operation of the forward.
"""
from __future__ import annotations

import dis
import sys
from types import CodeType

import torch
from torch.overrides import TorchFunctionMode

_OUT_OF_PLACE = {
    torch.Tensor.add_: torch.Tensor.add,
    torch.Tensor.sub_: torch.Tensor.sub,
    torch.Tensor.mul_: torch.Tensor.mul,
    torch.Tensor.div_: torch.Tensor.div,
    torch.Tensor.__iadd__: torch.Tensor.__add__,
    torch.Tensor.__isub__: torch.Tensor.__sub__,
    torch.Tensor.__imul__: torch.Tensor.__mul__,
    torch.Tensor.__itruediv__: torch.Tensor.__truediv__,
}
_AUGMENTED: dict[CodeType, frozenset[int]] = {}  # code object -> byte offsets of its augmented-assignment operators


def _augmented_offsets(code: CodeType) -> frozenset[int]:
    found = _AUGMENTED.get(code)
    if found is None:
        found = frozenset(ins.offset for ins in dis.get_instructions(code)
                          if ins.opname.startswith("INPLACE_")
                          or (ins.opname == "BINARY_OP" and ins.argrepr.endswith("=")))
        _AUGMENTED[code] = found
    return found


def from_augmented_assignment(depth: int = 2) -> bool:
    """Whether the Python frame ``depth`` levels up is executing an augmented-assignment operator."""
    frame = sys._getframe(depth)
    return frame.f_lasti in _augmented_offsets(frame.f_code)


class out_of_place_augmented(TorchFunctionMode):
    """Within it, ``tensor += other`` (and ``-=``, ``*=``, ``/=``) computes a new tensor while gradients are on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = _OUT_OF_PLACE.get(func)
        if out_of_place is not None and torch.is_grad_enabled() and from_augmented_assignment():
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)

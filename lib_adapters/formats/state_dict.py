"""Helpers over flat state dicts that every loader shares: the one home for them.

``load_strict`` puts a file's tensors into a model built from the shapes, refusing any missing,
extra or mis-shaped key with a message naming the file; ``split_prefixes`` groups keys by their
first component (``image_proj.*`` / ``ip_adapter.*``); ``numbered`` and ``shape_of`` read the
numbers and shapes that configs are built from.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from ..errors import FormatError

StateDict = Mapping[str, torch.Tensor]


def numbered(sd: StateDict | Mapping[str, object], pattern: str) -> list[int]:
    """The sorted distinct numbers captured by ``pattern``'s first group over the keys (``r"body\\.(\\d+)\\."``)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def split_prefixes(sd: StateDict, prefixes: tuple[str, ...], source: str) -> tuple[dict[str, torch.Tensor], ...]:
    """One dict per prefix (``"image_proj"`` -> its keys without ``"image_proj."``); a key under none of them is a
    ``FormatError``."""
    parts: tuple[dict[str, torch.Tensor], ...] = tuple({} for _ in prefixes)
    other = []
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in prefixes and rest:
            parts[prefixes.index(head)][rest] = value
        else:
            other.append(key)
    if other:
        raise FormatError(f"{source}: unexpected keys next to {'/'.join(prefixes)}: {', '.join(other[:3])}")
    return parts


def shape_of(sd: StateDict, key: str, source: str, where: str = "") -> tuple[int, ...]:
    """The shape of ``sd[key]``, or a ``FormatError`` saying the file lacks it."""
    if key not in sd:
        raise FormatError(f"{source}: the file lacks {where}{key}; it is incomplete or another model.")
    return tuple(int(d) for d in sd[key].shape)


def load_strict(module: nn.Module, sd: StateDict, source: str) -> None:
    """Load every key or fail with a message naming what is missing, extra, or mis-shaped."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} keys of the wrong shape (e.g. {k}: file {tuple(sd[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        raise FormatError(f"{source}: the weights do not fit the detected model: {'; '.join(parts)}. "
                          "The file is damaged or a variant this extension does not know.")
    module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)

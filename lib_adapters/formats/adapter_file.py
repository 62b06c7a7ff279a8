"""Load any adapter file: one read, the family from its keys (``detect.py``), then that family's loader.

``LOADERS`` is the formats half of an adapter family's detection entry: a new family adds its
signature to ``detect.SIGNATURES`` and its loader here (every loaded adapter says its ``family``,
which the inference side's registry builds a runtime for).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from .detect import ModelFamily, detect_family
from .faceid import LoadedFaceIDAdapter, faceid_from_state_dict
from .ip import LoadedIPAdapter, ip_from_state_dict
from .reader import read_weights
from .state_dict import StateDict
from .t2i import LoadedT2IAdapter, t2i_from_state_dict

LoadedAdapter = Union[LoadedT2IAdapter, LoadedIPAdapter, LoadedFaceIDAdapter]

LOADERS: dict[ModelFamily, Callable[[StateDict, str], LoadedAdapter]] = {
    ModelFamily.T2I_FULL: t2i_from_state_dict,
    ModelFamily.T2I_LIGHT: t2i_from_state_dict,
    ModelFamily.T2I_STYLE: t2i_from_state_dict,
    ModelFamily.IP_ADAPTER: ip_from_state_dict,
    ModelFamily.IP_FACEID: faceid_from_state_dict,  # Plus v2 from the name ("v2" in the file's stem)
}


def load_adapter(path: str | Path) -> LoadedAdapter:
    path = Path(path)
    sd = read_weights(path)
    family = detect_family(sd, path.name)[0]
    # not an adapter at all: the T2I loader names what the file is
    return LOADERS.get(family, t2i_from_state_dict)(sd, path.stem)

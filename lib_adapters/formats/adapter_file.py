"""Load any adapter file: one read, the family from its keys, then the family's own loader."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .detect import ModelFamily, detect_family
from .ip import LoadedIPAdapter, ip_from_state_dict
from .reader import read_weights
from .t2i import LoadedT2IAdapter, t2i_from_state_dict

LoadedAdapter = Union[LoadedT2IAdapter, LoadedIPAdapter]


def load_adapter(path: str | Path) -> LoadedAdapter:
    path = Path(path)
    sd = read_weights(path)
    family = detect_family(sd, path.name)[0]
    if family is ModelFamily.IP_ADAPTER:
        return ip_from_state_dict(sd, path.stem)
    return t2i_from_state_dict(sd, path.stem)  # names the family when it is not an adapter at all

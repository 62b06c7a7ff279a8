"""Reading weight files without executing code.

``.safetensors`` is read natively; pickled ``.pth/.pt/.bin/.ckpt`` only through
``torch.load(weights_only=True)``. Nested dicts (IP-Adapter ``.bin`` files hold
``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened to dotted keys, and a lone
``state_dict``/``module`` wrapper is unwrapped. Every failure becomes a ``FormatError`` or
``MissingFileError`` naming the file and what to do. ``read_weights`` also refuses weights that
hold NaN or infinite values: such a file is damaged, and loaded it would turn a whole generation
into NaN (or a black image) instead of costing one unit.
"""
from __future__ import annotations

import json
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from ..errors import FormatError, MissingFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MODEL_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
_WRAPPER_KEYS = ("state_dict", "module", "model")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file on the CPU, keyed by flat dotted names."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Model file not found: {path}. Put the file there or pick another model.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        raw = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_pickle(path)
    else:
        raise FormatError(
            f"{path.name}: unsupported file type '{suffix}'. Use one of {', '.join(MODEL_SUFFIXES)}."
        )
    flat = flatten_state_dict(raw)
    if not flat:
        raise FormatError(f"{path.name}: the file holds no tensors; it is not a model file.")
    return flat


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``read_state_dict`` for a model about to be used: every floating-point tensor must be finite."""
    path = Path(path)
    sd = read_state_dict(path)
    check_finite(sd, path.name)
    return sd


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """FormatError naming the first tensor (in file order) that holds NaN or infinite values."""
    for key, tensor in sd.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nans = int(torch.isnan(tensor).sum())
        raise FormatError(
            f"{source}: the tensor '{key}' holds {nans} NaN and {int((~finite).sum()) - nans} infinite values "
            f"(of {tensor.numel()}): the file is damaged, often by an interrupted or corrupted download. "
            "Download it again.")


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, shapes, metadata) without its data."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty for other files), read from the header only."""
    meta = _safetensors_header(Path(path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file from its header, without reading any data."""
    header = _safetensors_header(Path(path))
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def read_safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a safetensors file, cheaply (header only); empty for other or damaged files."""
    return [k for k in _safetensors_header(Path(path)) if k != "__metadata__"]


def flatten_state_dict(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a possibly nested dict as ``{"a.b.c": tensor}``; non-tensor leaves are dropped."""
    if isinstance(obj, dict) and not prefix:
        wrapped = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)]
        if len(wrapped) == 1 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapped[0]]
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten_state_dict(value, name))
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged headers/data
        raise FormatError(
            f"{path.name}: cannot read this safetensors file ({exc}). It is damaged or incomplete, "
            "often an interrupted download: download it again."
        ) from exc


def torch_load():
    """torch's own loader. Inside the WebUI ``torch.load`` is ``modules.safe.load``, which rejects the
    ``.format_version`` entry current torch writes and returns None instead of raising; with
    ``weights_only=True`` torch's restricted unpickler already refuses code, so use the original
    (looked up, not imported: the core never imports the WebUI)."""
    safe = sys.modules.get("modules.safe")
    return getattr(safe, "unsafe_torch_load", None) or torch.load


def _read_pickle(path: Path) -> object:
    try:
        loaded = torch_load()(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{path.name}: the file contains Python objects other than weights, which are not loaded "
            "for safety. Use a .safetensors version of this model."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FormatError(
            f"{path.name}: cannot read this file ({exc}). It is damaged or incomplete, often an "
            "interrupted download: download it again."
        ) from exc
    if loaded is None:
        raise FormatError(f"{path.name}: the file could not be read as weights; it is damaged or not a model file.")
    return loaded

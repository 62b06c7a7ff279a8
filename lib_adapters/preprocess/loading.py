"""Loading detector weights from the local annotator folder, never from the network.

The rules every weight-needing preprocessor goes through:

1. Every file must already exist in the folder the caller passes; otherwise ``MissingFileError``
   names the file, the folder and where to get it. Nothing is ever downloaded (some controlnet-aux
   loaders would silently fetch from the internet if a file were missing, so we never let them
   see a missing file).
2. Pickled checkpoints are opened with ``torch.load(weights_only=True)`` so a malicious ``.pth``
   dropped into the folder cannot run code (torch 2.1, the WebUI's version, defaults to the
   unsafe full unpickler).
3. The detector is built with the Hugging Face hub forced offline, as a second line of defence.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from ..errors import AdapterError, FormatError, MissingFileError
from .spec import DetectorSpec

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_files(spec: DetectorSpec, weights_dir: Optional[Path], preprocessor: str) -> Path:
    """Return the folder if it holds every file of ``spec``; otherwise raise MissingFileError."""
    urls = ", ".join(f"{spec.source_url}/{name}" for name in spec.files)
    if weights_dir is None:
        raise MissingFileError(
            f"Preprocessor {preprocessor!r} needs {', '.join(spec.files)}, but no annotator weights "
            f"folder is configured. Set the folder in Settings, then download the file(s) from "
            f"{spec.source} ({urls}) into it."
        )
    folder = Path(weights_dir).expanduser()
    missing = [name for name in spec.files if not (folder / name).is_file()]
    if missing:
        where = ", ".join(f"{spec.source_url}/{name}" for name in missing)
        noun, pronoun = ("file", "it") if len(missing) == 1 else ("files", "them")
        state = "does not exist" if not folder.is_dir() else f"does not contain {pronoun}"
        raise MissingFileError(
            f"Preprocessor {preprocessor!r} needs the {noun} {', '.join(missing)} in the folder "
            f"{folder}, which {state}. Download {pronoun} from {spec.source} ({where}) and put "
            f"{pronoun} there; nothing is downloaded automatically."
        )
    return folder


def load_checkpoint(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; FormatError if that fails."""
    from ..formats.reader import torch_load

    try:
        return torch_load()(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, or a pickle with code in it
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"Could not read the weights file {path} as a plain PyTorch checkpoint "
            f"({first_line}). It is corrupt, truncated, or contains pickled code, which is not "
            f"loaded for safety. Download it again from the original source."
        ) from None


def load_state_dict(module: Any, state_dict: Mapping[str, Any], path: Path, strict: bool = True) -> None:
    """``module.load_state_dict`` with a FormatError that names the file on a key/shape mismatch."""
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        summary = " ".join(line.strip() for line in detail[:3])
        raise FormatError(
            f"The weights file {path} does not fit the network it is meant for ({summary}). "
            f"Check that the right file is in place under this exact name."
        ) from None


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drop a DataParallel-style prefix such as ``module.`` from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Force the Hugging Face libraries offline for the duration, then restore the environment."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    try:
        for name in _OFFLINE_VARS:
            os.environ[name] = "1"
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_detector(
    spec: DetectorSpec, weights_dir: Optional[Path], preprocessor: str, device: str
) -> Any:
    """Check the files, then build the detector offline.

    Raises MissingFileError (a file is absent), FormatError (a file is unreadable or does not fit)
    and AdapterError (controlnet-aux is missing or the detector failed to build).
    """
    folder = require_files(spec, weights_dir, preprocessor)
    try:
        with hub_offline():
            return spec.build(tuple(folder / name for name in spec.files), device)
    except AdapterError:
        raise
    except ImportError as exc:
        raise AdapterError(
            f"Preprocessor {preprocessor!r} needs the controlnet-aux package and its dependencies "
            f"({exc}). Install them into the WebUI's Python: pip install controlnet-aux"
        ) from exc
    except Exception as exc:  # a broken detector must fail its unit, not the whole generation
        raise AdapterError(
            f"Preprocessor {preprocessor!r} could not be loaded from {folder}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc

"""Which adapter files the panel offers, and their short hashes for infotext.

Our own folders (``models/adapters`` and any the user adds in Settings) are listed whole, but for
LoRA files (a FaceID adapter's paired ``*_lora.safetensors`` may sit next to it: the unit finds it
there, it is not a model to pick). A shared
folder such as sd-webui-controlnet's ``models/ControlNet`` holds ControlNets too, so from it we
list only files whose safetensors header has adapter keys, and pickled files whose name says
adapter (the header of a pickle cannot be read without loading it). Detection proper always
happens on load, from keys and shapes.

Short hashes in infotext are the ones sd-webui-controlnet shows for the same file (its model list
and infotext use the WebUI's ``sd_models.model_hash``: the first 8 hex digits of the sha256 of the
64 KiB at offset 1 MiB), so a unit written by one extension names the same ``model [hash]`` as the
other. Names are resolved with either that hash or the full-file sha256 prefix our infotext wrote
before, or none; a name not found is looked up by its short hash, so a renamed file still resolves.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import FormatError, MissingFileError
from .formats.adapter_file import LOADERS
from .formats.detect import ModelFamily, detect_family
from .formats.reader import (MODEL_SUFFIXES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_keys,
                             read_safetensors_shapes, read_state_dict)

SKIPPED_SUBFOLDERS = ("annotators", "clip_vision")  # preprocessor weights and encoders, not adapters
_ADAPTER_NAME_HINTS = ("t2i", "adapter", "t2ia", "ip-adapter", "ip_adapter", "ipadapter")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path


def _is_adapter_file_in_shared_folder(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return any(h in path.name.lower() for h in _ADAPTER_NAME_HINTS)
    keys = read_safetensors_keys(path)
    try:
        family = detect_family({k: None for k in keys})[0]  # key presence is all the signatures read
    except FormatError:
        return False
    return family in LOADERS  # a family the panel loads


def _is_lora_file(path: Path) -> bool:
    """A safetensors LoRA (its header's keys say so); pickles are not opened to list them."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return False
    try:
        return detect_family({k: None for k in read_safetensors_keys(path)})[0] is ModelFamily.LORA
    except FormatError:
        return False


def _model_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.rglob("*")):
        rel_parts = path.relative_to(folder).parts
        if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES and not set(rel_parts[:-1]) & set(SKIPPED_SUBFOLDERS):
            files.append(path)
    return files


@dataclass
class ModelCatalog:
    own_folders: Sequence[Path]
    shared_folders: Sequence[Path] = ()
    _entries: dict[str, ModelEntry] = field(default_factory=dict)
    _hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)

    def refresh(self) -> list[str]:
        entries: dict[str, ModelEntry] = {}
        candidates = [p for f in self.own_folders for p in _model_files(Path(f)) if not _is_lora_file(p)]
        candidates += [p for f in self.shared_folders for p in _model_files(Path(f))
                       if _is_adapter_file_in_shared_folder(p)]
        for path in candidates:
            name = path.stem
            if name in entries:  # same stem in two folders: keep both, qualified by folder
                name = f"{path.parent.name}/{path.stem}"
            entries.setdefault(name, ModelEntry(name, path))
        self._entries = entries
        return self.names()

    def names(self) -> list[str]:
        return sorted(self._entries, key=str.lower)

    def resolve(self, name: str) -> Path:
        """The file for a listed name (also accepts "name [hash]" as written in infotext: the file of that
        name, or, when no file has the name, the one whose short hash it gives)."""
        bare, written_hash = split_name_and_hash(name)
        if bare not in self._entries or not self._entries[bare].path.is_file():
            self.refresh()
        entry = self._entries.get(bare)
        if entry is None and written_hash:
            entry = self._by_hash(written_hash)
        if entry is None:
            folders = ", ".join(str(f) for f in list(self.own_folders) + list(self.shared_folders))
            raise MissingFileError(f"adapter model '{bare}' not found. Put the file in one of: {folders}, "
                                   "then press the refresh button next to the model list.")
        return entry.path

    def _by_hash(self, written_hash: str) -> ModelEntry | None:
        """The one listed file with this short hash. Files under 1 MiB all hash the same empty range, so
        they never match (no adapter is that small); two files with one hash match neither."""
        matches = [e for e in self._entries.values()
                   if e.path.is_file() and e.path.stat().st_size > HASHED_OFFSET and self.short_hash(e.path) == written_hash]
        return matches[0] if len(matches) == 1 else None

    def short_hash(self, path: Path) -> str:
        """sd-webui-controlnet's hash of the file (``model_short_hash``), once per file version."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = model_short_hash(path)
        return self._hashes[key]


HASHED_OFFSET, HASHED_LENGTH = 0x100000, 0x10000


def model_short_hash(path: Path) -> str:
    """The WebUI's ``sd_models.model_hash``, which sd-webui-controlnet writes after model names: the first 8
    hex digits of the sha256 of the 64 KiB at offset 1 MiB (of nothing for files under 1 MiB). It reads
    64 KiB whatever the file's size, so listing and infotext cost no full read of a 2 GB file."""
    with Path(path).open("rb") as f:
        f.seek(HASHED_OFFSET)
        return hashlib.sha256(f.read(HASHED_LENGTH)).hexdigest()[:8]


def split_name_and_hash(text: str) -> tuple[str, str]:
    """``"name [1a2b3c4d]"`` -> ``("name", "1a2b3c4d")``; a name without a hash -> ``(name, "")``."""
    bare, sep, rest = text.partition(" [")
    written = rest.rstrip().rstrip("]").strip().lower() if sep else ""
    return bare.strip(), written


@dataclass(frozen=True)
class EncoderFile:
    path: Path
    hidden_size: int
    projection_dim: int


def _encoder_dims(path: Path) -> EncoderFile | None:
    """Widths of a CLIP vision file: from the safetensors header, else by loading the pickle."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes = read_safetensors_shapes(path)
    else:
        try:
            shapes = {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
        except (FormatError, MissingFileError):
            return None
    cls, proj = shapes.get("vision_model.embeddings.class_embedding"), shapes.get("visual_projection.weight")
    if not cls or not proj:
        return None
    return EncoderFile(path, int(cls[0]), int(proj[0]))


@dataclass
class EncoderCatalog:
    """CLIP vision encoders in ``models/clip_vision`` (and any other folders), matched by width."""

    folders: Sequence[Path]
    _files: list[EncoderFile] | None = None

    def refresh(self) -> list[EncoderFile]:
        self._files = [f for folder in self.folders for p in _model_files(Path(folder))
                       for f in [_encoder_dims(p)] if f is not None]
        return self._files

    def find(self, hidden_states: bool, width: int, description: str) -> Path:
        """The first encoder whose hidden size (or projection size) is ``width``."""
        for attempt in range(2):
            files = self._files if (self._files is not None and attempt == 0) else self.refresh()
            for f in files:
                if (f.hidden_size if hidden_states else f.projection_dim) == width and f.path.is_file():
                    return f.path
        folders = ", ".join(str(f) for f in self.folders)
        raise MissingFileError(
            f"this adapter needs a {description} CLIP vision encoder and none was found in {folders}. "
            "Put the encoder that comes with IP-Adapter there (for ViT-H/14: models/image_encoder/model.safetensors "
            "of h94/IP-Adapter, for ViT-bigG/14: sdxl_models/image_encoder/model.safetensors), any file name.")

"""Loaded models (adapters and CLIP vision encoders) kept in memory between generations.

A T2I unit, an IP unit and the IP unit's encoder are three models; every one of them must survive
from one generation to the next, or the 2.5 GB encoder is read from disk again each time. So the
cache is bounded by memory, not by a count: models are kept, least recently used first out, while
their parameters and buffers together fit the budget (Settings, in MB). A model the current
generation loaded is pinned until the generation ends (``release``): whatever the budget, a
generation never loses a model it uses, and the cache trims to the budget after it.

Entries are keyed by file path, size and modification time, so a replaced file is read again. Its
owner (the panel's shared resources) empties it when the checkpoint or the device changes.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MissingFileError
from ..formats.adapter_file import LoadedAdapter, load_adapter
from ..formats.clip_vision import load_clip_vision
from ..models.clip_vision import ClipVisionEncoder

log = logging.getLogger("adapters")

MB = 1 << 20
# Enough for three units and their encoders in fp32 (sizes measured on the released shapes):
# SDXL's ip-adapter_sdxl (1.31 GiB) with its ViT-bigG/14 (6.87 GiB) plus two SDXL T2I-Adapters
# (0.29 GiB each) need 8.8 GiB; any SD1.5 set (ViT-H/14 2.36 GiB, ViT-L/14 1.13 GiB for the style
# adapter, adapters 0.08-0.29 GiB) needs under 4.3 GiB.
DEFAULT_BUDGET_MB = 10240


@dataclass(frozen=True)
class FileKey:
    """A file's identity for caching: the same path with another size or mtime is another file."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> "FileKey":
        path = Path(path)
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise MissingFileError(f"{path.name} is no longer in {path.parent}; put it back or pick "
                                   "another model (then press the refresh button).") from exc
        return cls(str(path), stat.st_size, stat.st_mtime_ns)


def module_of(value: Any) -> torch.nn.Module | None:
    """The network a cached value holds (an adapter's ``module``/``model``, an encoder's ``model``)."""
    if isinstance(value, torch.nn.Module):
        return value
    for name in ("module", "model"):
        inner = getattr(value, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def memory_bytes(value: Any) -> int:
    """Bytes of the parameters and buffers a cached value holds (each storage counted once); a value that is not
    a network says its size itself (``nbytes``: a FaceID model's paired LoRA)."""
    module = module_of(value)
    if module is None:
        return int(getattr(value, "nbytes", 0) or 0)
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@dataclass
class _Entry:
    value: Any
    nbytes: int


@dataclass
class AdapterCache:
    budget_bytes: int = DEFAULT_BUDGET_MB * MB
    _items: "OrderedDict[tuple[str, FileKey], _Entry]" = field(default_factory=OrderedDict)
    _pinned: set = field(default_factory=set)
    loads: int = 0  # files read so far (what the cache exists to avoid)
    _warned_over: bool = False

    # reading --------------------------------------------------------------------------------
    def get(self, kind: str, path: str | Path, loader: Callable[[Path], Any]) -> Any:
        """The loaded model for ``path``, read with ``loader`` on a miss; pinned until ``release``."""
        key = (kind, FileKey.of(path))
        entry = self._items.get(key)
        if entry is None:
            value = loader(Path(path))
            self.loads += 1
            entry = _Entry(value, memory_bytes(value))
            self._items[key] = entry
        self._items.move_to_end(key)
        self._pinned.add(key)
        self._trim()
        return entry.value

    def load_adapter(self, path: Path) -> LoadedAdapter:
        """A T2I-Adapter or an IP-Adapter, whichever the file holds."""
        return self.get("adapter", path, load_adapter)

    def load_encoder(self, path: Path) -> ClipVisionEncoder:
        return self.get("clip_vision", path, load_clip_vision)

    # lifetime -------------------------------------------------------------------------------
    def release(self) -> None:
        """The generation that pinned its models is over: they may be evicted from now on."""
        self._pinned.clear()
        self._trim()

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._trim()

    def clear(self) -> None:
        self._items.clear()
        self._pinned.clear()

    # what it holds ----------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._items.values())

    def cached_paths(self) -> list[str]:
        """Paths held, least recently used first."""
        return [key[1].path for key in self._items]

    def _trim(self) -> None:
        """Evict least recently used, unpinned models until the rest fits the budget."""
        total = self.total_bytes
        for key in list(self._items):
            if total <= self.budget_bytes:
                break
            if key in self._pinned:
                continue
            total -= self._items.pop(key).nbytes
        if total > self.budget_bytes and not self._warned_over:
            self._warned_over = True  # once: a generation whose models exceed the budget keeps them anyway
            log.warning("the adapter models in use take %.0f MB, more than the %.0f MB set in Settings -> Adapters; "
                        "they are kept while the generation runs, and some are read again next time",
                        total / MB, self.budget_bytes / MB)

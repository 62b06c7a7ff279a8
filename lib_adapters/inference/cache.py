"""A small LRU of loaded models (adapters and CLIP vision encoders), keyed by file path and
version, so repeated generations do not re-read hundreds of megabytes; its owner decides its size
and when to clear it."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import MissingFileError
from ..formats.adapter_file import LoadedAdapter, load_adapter
from ..formats.t2i import LoadedT2IAdapter, load_t2i_adapter
from ..models.clip_vision import ClipVisionEncoder, load_clip_vision


@dataclass
class AdapterCache:
    max_items: int = 2
    _items: "OrderedDict[tuple[str, str, int, int], Any]" = field(default_factory=OrderedDict)

    def _get(self, kind: str, path: Path, loader: Callable[[Path], Any]) -> Any:
        try:
            stat = Path(path).stat()
        except FileNotFoundError as exc:
            raise MissingFileError(f"{Path(path).name} is no longer in {Path(path).parent}; put it back or pick "
                                   "another model (then press the refresh button).") from exc
        key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        loaded = loader(path)
        self._items[key] = loaded
        while len(self._items) > max(self.max_items, 1):
            self._items.popitem(last=False)
        return loaded

    def load_t2i(self, path: Path) -> LoadedT2IAdapter:
        return self._get("t2i", path, load_t2i_adapter)

    def load_adapter(self, path: Path) -> LoadedAdapter:
        """A T2I-Adapter or an IP-Adapter, whichever the file holds."""
        return self._get("adapter", path, load_adapter)

    def load_encoder(self, path: Path) -> ClipVisionEncoder:
        return self._get("clip_vision", path, load_clip_vision)

    def clear(self) -> None:
        self._items.clear()

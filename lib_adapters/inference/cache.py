"""A small LRU of loaded adapters, keyed by file path and version, so repeated generations
do not re-read hundreds of megabytes; its owner decides its size and when to clear it."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..formats.t2i import LoadedT2IAdapter, load_t2i_adapter


@dataclass
class AdapterCache:
    max_items: int = 2
    _items: "OrderedDict[tuple[str, int, int], LoadedT2IAdapter]" = field(default_factory=OrderedDict)

    def load_t2i(self, path: Path) -> LoadedT2IAdapter:
        stat = Path(path).stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        loaded = load_t2i_adapter(path)
        self._items[key] = loaded
        while len(self._items) > max(self.max_items, 1):
            self._items.popitem(last=False)
        return loaded

    def clear(self) -> None:
        self._items.clear()

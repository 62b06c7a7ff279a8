"""Forge's model loader over the stub's one-loaded-patcher-per-model ``memory``, for both flavours' loader modules
(``hosts/main/backend/memory_management.py``, ``hosts/classic/ldm_patched/modules/model_management.py``).

``load(models)`` loads each patcher (main: its LoRAs merged by the model's ``LoraLoader``; Classic: the model's other
loaded clones unpatched, then its own weight patches merged in). ``ALWAYS_OFFLOAD`` stands for
``--always-offload-from-vram``: Forge then frees memory for every load, already loaded models included, by unloading
every *other* loaded model (``free_memory`` with the requested ones kept); ``evicted`` records the patchers unloaded
that way. ``current_loaded_models()`` lists the loaded ones as Forge's ``LoadedModel`` (``.model``).
"""
from __future__ import annotations

from types import SimpleNamespace

from .patcher import CLASSIC, memory

ALWAYS_OFFLOAD = False
evicted: list = []


def current_loaded_models() -> list:
    return [SimpleNamespace(model=patcher) for patcher in memory.loaded]


def load(models) -> None:
    for model in models:
        memory.load(model)
    if ALWAYS_OFFLOAD:
        for other in [p for p in memory.loaded if all(p is not m for m in models)]:
            memory.loaded.remove(other)
            if other.flavour == CLASSIC:
                other.unpatch_model()
            evicted.append(other)

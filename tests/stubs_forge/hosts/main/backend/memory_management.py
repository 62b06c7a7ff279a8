"""``backend.memory_management``: Forge main's loader, over the stub's one-loaded-patcher-per-model ``memory``
(``load_models_gpu`` unloads the model's other loaded clones and loads each patcher: its LoRAs merged).

``ALWAYS_OFFLOAD`` stands for ``--always-offload-from-vram``: Forge then frees memory for every load, already
loaded models included, by unloading every *other* loaded model (``free_memory`` with the requested ones kept);
``evicted`` records the patchers unloaded that way. ``current_loaded_models`` lists the loaded ones (``.model``).
"""
from types import SimpleNamespace

from stubs_forge.patcher import CLASSIC, memory

ALWAYS_OFFLOAD = False
evicted: list = []


def __getattr__(name):
    if name == "current_loaded_models":
        return [SimpleNamespace(model=patcher) for patcher in memory.loaded]
    raise AttributeError(name)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        memory.load(model)
    if ALWAYS_OFFLOAD:
        for other in [p for p in memory.loaded if all(p is not m for m in models)]:
            memory.loaded.remove(other)
            if other.flavour == CLASSIC:
                other.unpatch_model()
            evicted.append(other)


def load_model_gpu(model):
    return load_models_gpu([model])

"""``backend.memory_management``: Forge main's loader, over the stub's one-loaded-patcher-per-model ``memory``
(``load_models_gpu`` unloads the model's other loaded clones and loads each patcher: its LoRAs merged)."""
from stubs_forge.patcher import memory


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        memory.load(model)


def load_model_gpu(model):
    return load_models_gpu([model])

"""``ldm_patched.modules.model_management``: Forge Classic's loader, over the stub's ``memory`` (loading a patcher
unpatches the model's other loaded clones, then patches its own weights in)."""
from stubs_forge.patcher import memory


def load_models_gpu(models, memory_required=0):
    for model in models:
        memory.load(model)


def load_model_gpu(model):
    return load_models_gpu([model])

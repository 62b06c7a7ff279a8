"""``ldm_patched.modules.model_management``: Forge Classic's loader, with its signatures, over ``stubs_forge.loader``."""
from stubs_forge import loader


def __getattr__(name):
    if name == "current_loaded_models":
        return loader.current_loaded_models()
    raise AttributeError(name)


def load_models_gpu(models, memory_required=0):
    loader.load(models)


def load_model_gpu(model):
    return load_models_gpu([model])

"""WebUI entry point for the Adapters panel; the WebUI loads every class here that subclasses
``scripts.Script`` (``AdaptersScript``) and runs the callback registrations below at import."""
from modules import script_callbacks

from lib_adapters.webui.panel import infotext, release_resources, settings
from lib_adapters.webui.panel.script import AdaptersScript  # noqa: F401  (loaded by the WebUI)

settings.register()
script_callbacks.on_infotext_pasted(infotext.on_infotext_pasted)
script_callbacks.on_script_unloaded(release_resources)
# another checkpoint (or the same one loaded again, possibly on another device): cached models and encoder
# outputs are dropped, so their memory goes back before the next generation fills the caches again
script_callbacks.on_model_loaded(lambda _sd_model: release_resources())

"""The only package that imports the WebUI's ``modules`` or gradio: the Adapters panel (``panel/``: script,
generation, settings, infotext) and the Train Adapter tab with its web API (``training_*``)."""

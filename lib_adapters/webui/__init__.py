"""The only package that imports the WebUI's ``modules`` or gradio: panel, settings, infotext, API."""

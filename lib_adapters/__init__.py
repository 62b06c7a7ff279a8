"""Adapters for the AUTOMATIC1111 WebUI: T2I-Adapter and IP-Adapter inference, adapter training.

The core (everything here except ``lib_adapters.webui``) depends only on torch, numpy, PIL and
safetensors and never imports the WebUI's ``modules`` or gradio.
"""

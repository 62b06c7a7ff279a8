"""Training: config, datasets, a compact loop, checkpoints, methods (LoRA) and model backends.

Nothing here imports the WebUI; the WebUI glue hands in a backend built over ``shared.sd_model``.
"""

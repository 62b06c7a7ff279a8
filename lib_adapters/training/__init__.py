"""Training: one schema (``config``, ``request``, ``cli_args``), one job layer (``job``), a compact loop (``loop``),
its checkpoints and files (``run_checkpoints``, ``outputs``), datasets (``data``, ``t2i_data``, ``ip_data``), methods
(LoRA, T2I-Adapter, IP-Adapter) and model backends; the command-line trainer (``cli``).

Nothing here imports the WebUI; the WebUI glue hands in a backend built over ``shared.sd_model``.
"""

"""The "Train Adapter" tab and the training web API: the WebUI's side of ``lib_adapters.training``.

``host`` (the WebUI glue: queue lock, progress, Lora unload/restore, the folders and their lists), ``jobs``
(one background run at a time over ``training.job``), ``api`` (the routes), ``tab`` / ``knobs`` / ``view``
(the tab's layout, its per-method knobs, and what it shows as plain data).
"""

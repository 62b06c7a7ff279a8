"""Fake of ``modules/paths.py``: re-exports the directory names of ``paths_internal``.

The real module also puts ``repositories/*`` (ldm, sgm, k-diffusion, BLIP) on ``sys.path``;
here ``ldm`` comes from the installed ``stable-diffusion-sdkit`` package and ``sgm``/``k_diffusion``
are absent. ``paths`` maps a repository title to its directory, as in the real module.
Use :func:`modules.paths_internal.configure` to move the tree; it updates this module too.
"""
from __future__ import annotations

import os

import modules.safe  # noqa: F401  (the real paths.py imports it for its side effect too)
from modules.paths_internal import (  # noqa: F401
    cwd, data_path, default_output_dir, extensions_builtin_dir, extensions_dir, models_path, script_path,
)

sd_path = os.path.join(script_path, "repositories", "stable-diffusion-stability-ai")
paths: dict[str, str] = {}

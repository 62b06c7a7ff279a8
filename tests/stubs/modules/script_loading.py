"""Fake of ``modules/script_loading.py``: importing script files the way the WebUI loader does.

``load_module`` is the real helper (module named after the file's basename).
:func:`load_script_file` (stub-only) adds what ``scripts.load_scripts`` does around it for one file:
``basedir()`` returns the extension root and that root is first on ``sys.path`` only during the
import; every ``Script`` subclass defined in the file is appended to ``scripts.scripts_data`` (so
``driver.build_runners(None)`` instantiates them). ``preload_extensions`` runs ``preload.py`` files.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from modules import errors, scripts


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preload_extensions(extensions_dir: str, parser, extension_list: list[str] | None = None) -> None:
    """Call ``preload(parser)`` of every ``<extensions_dir>/<ext>/preload.py``."""
    if not os.path.isdir(extensions_dir):
        return
    for dirname in sorted(os.listdir(extensions_dir)):
        if extension_list is not None and dirname not in extension_list:
            continue
        preload_script = os.path.join(extensions_dir, dirname, "preload.py")
        if not os.path.isfile(preload_script):
            continue
        try:
            module = load_module(preload_script)
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception:
            errors.report(f"Error running preload() for {preload_script}", exc_info=True)


def load_script_file(path: str, basedir: str | None = None) -> ModuleType:
    """Import one extension script file like ``scripts.load_scripts`` and register its Script classes.

    ``basedir`` defaults to two levels up (the extension root for ``<ext>/scripts/x.py``). Returns the module.
    """
    path = os.path.abspath(path)
    base = os.path.abspath(basedir) if basedir else os.path.dirname(os.path.dirname(path))
    syspath = sys.path
    try:
        sys.path = [base] + sys.path
        scripts.current_basedir = base
        module = load_module(path)
    finally:
        sys.path = syspath
        scripts.current_basedir = None
    for script_class in module.__dict__.values():
        if isinstance(script_class, type) and issubclass(script_class, scripts.Script) and script_class.__module__ == module.__name__:
            scripts.scripts_data.append(scripts.ScriptClassData(script_class, path, base, module))
    return module

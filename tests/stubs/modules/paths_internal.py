"""Fake of ``modules/paths_internal.py``: the WebUI's directory layout.

The real module derives everything from the WebUI checkout and ``--data-dir``/``--models-dir``.
Here the default root is ``<tempdir>/adapters-webui-stub`` (nothing is created at import time).
Tests point everything at their own directory with :func:`configure`, which also updates the
copies held by ``modules.paths``, ``modules.shared``, ``modules.sd_models`` and ``shared.cmd_opts``
(the real modules copy these names with ``from ... import``, so plain monkeypatching of one module
would leave the others stale).
"""
from __future__ import annotations

import os
import sys
import tempfile

cwd = os.getcwd()
modules_path = os.path.dirname(os.path.realpath(__file__))

script_path = os.path.join(tempfile.gettempdir(), "adapters-webui-stub")
"""The WebUI root (where webui.py lives)."""

data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
config_states_dir = os.path.join(script_path, "config_states")
default_output_dir = os.path.join(data_path, "outputs")
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file

_PATH_NAMES = (
    "script_path", "data_path", "models_path", "extensions_dir", "extensions_builtin_dir",
    "config_states_dir", "default_output_dir", "sd_configs_path", "sd_default_config",
    "sd_model_file", "default_sd_model_file",
)


def configure(root: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
              models_dir: str | os.PathLike | None = None, create: bool = True) -> dict[str, str]:
    """Point the fake WebUI at ``root`` (like running it from there with ``--data-dir``/``--models-dir``).

    Returns the new path values. With ``create`` the data, models, extensions and outputs
    directories are made. Modules that copied the names (``modules.paths``, ``modules.shared``,
    ``modules.sd_models``) and ``shared.cmd_opts`` are updated if already imported.
    """
    values = _compute(os.fspath(root), data_dir, models_dir)
    globals().update(values)
    for name in ("modules.paths", "modules.shared"):
        module = sys.modules.get(name)
        if module is not None:
            for key, value in values.items():
                if hasattr(module, key):
                    setattr(module, key, value)
    _update_dependents(values)
    if create:
        for key in ("data_path", "models_path", "extensions_dir", "default_output_dir"):
            os.makedirs(values[key], exist_ok=True)
    return values


def _compute(root: str, data_dir, models_dir) -> dict[str, str]:
    script = os.path.abspath(root)
    data = os.path.abspath(os.fspath(data_dir)) if data_dir is not None else script
    models = os.path.abspath(os.fspath(models_dir)) if models_dir is not None else os.path.join(data, "models")
    configs = os.path.join(script, "configs")
    return {
        "script_path": script,
        "data_path": data,
        "models_path": models,
        "extensions_dir": os.path.join(data, "extensions"),
        "extensions_builtin_dir": os.path.join(script, "extensions-builtin"),
        "config_states_dir": os.path.join(script, "config_states"),
        "default_output_dir": os.path.join(data, "outputs"),
        "sd_configs_path": configs,
        "sd_default_config": os.path.join(configs, "v1-inference.yaml"),
        "sd_model_file": os.path.join(script, "model.ckpt"),
        "default_sd_model_file": os.path.join(script, "model.ckpt"),
    }


def _update_dependents(values: dict[str, str]) -> None:
    shared = sys.modules.get("modules.shared")
    if shared is not None and getattr(shared, "cmd_opts", None) is not None:
        from modules import cmd_args
        cmd_args.apply_path_defaults(shared.cmd_opts, values, models_dir_given=True)
        shared.config_filename = shared.cmd_opts.ui_settings_file
    sd_models = sys.modules.get("modules.sd_models")
    if sd_models is not None:
        sd_models.model_path = os.path.abspath(os.path.join(values["models_path"], sd_models.model_dir))

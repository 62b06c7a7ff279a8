"""Fake of ``modules/cmd_args.py`` (plus ``--lora-dir``/``--lyco-dir-backcompat`` that the builtin
Lora extension adds in its ``preload.py``): the WebUI's command-line flags that an extension may read.

Only a subset of the ~120 real flags is declared (names and defaults as in v1.10.1). Path flags
default to ``None`` here and are filled from ``paths_internal`` by :func:`apply_path_defaults`.
"""
from __future__ import annotations

import argparse
import os

parser = argparse.ArgumentParser()

_FLAGS = (
    "skip-install", "skip-prepare-environment", "skip-python-version-check", "skip-torch-cuda-test",
    "skip-version-check", "reinstall-torch", "reinstall-xformers", "update-all-extensions", "test-server",
    "no-half", "no-half-vae", "upcast-sampling", "medvram", "medvram-sdxl", "lowvram", "lowram",
    "always-batch-cond-uncond", "xformers", "force-enable-xformers", "xformers-flash-attention",
    "opt-split-attention", "opt-sub-quad-attention", "opt-split-attention-invokeai", "opt-split-attention-v1",
    "opt-sdp-attention", "opt-sdp-no-mem-attention", "disable-opt-split-attention", "disable-nan-check",
    "use-ipex", "api", "api-log", "api-server-stop", "nowebui", "listen", "share", "autolaunch",
    "enable-insecure-extension-access", "disable-safe-unpickle", "freeze-settings", "hide-ui-dir-config",
    "no-hashing", "no-download-sd-model", "do-not-download-clip", "disable-all-extensions",
    "disable-extra-extensions", "skip-load-model-at-start", "no-prompt-history", "administrator",
    "disable-model-loading-ram-optimization", "opt-channelslast", "allow-code",
)
for _flag in _FLAGS:
    parser.add_argument(f"--{_flag}", action="store_true", default=False)

_VALUED: dict[str, object] = {
    "loglevel": None, "data-dir": None, "models-dir": None, "config": None, "ckpt": None, "ckpt-dir": None,
    "vae-dir": None, "embeddings-dir": None, "hypernetwork-dir": None, "lora-dir": None,
    "lyco-dir-backcompat": None, "ui-settings-file": None, "ui-config-file": None, "styles-file": None,
    "api-auth": None, "gradio-auth": None, "gradio-auth-path": None, "server-name": None, "ngrok": None,
    "device-id": None,
    "freeze-settings-in-sections": None, "freeze-specific-settings": None, "cors-allow-origins": None,
}
for _name, _default in _VALUED.items():
    parser.add_argument(f"--{_name}", type=str, default=_default)
parser.add_argument("--precision", type=str, choices=["full", "half", "autocast"], default="autocast")
parser.add_argument("--use-cpu", nargs="+", default=[])
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--max-batch-count", type=int, default=16)
parser.add_argument("--filenames-max-length", type=int, default=128)


def apply_path_defaults(opts: argparse.Namespace, paths: dict[str, str], *, models_dir_given: bool = False) -> None:
    """Fill path flags from the current ``paths_internal`` values (the real parser computes these defaults
    from the WebUI checkout at import). ``models_dir_given`` re-derives dirs that follow ``models_path``."""
    models = paths["models_path"]
    derived = {
        "data_dir": paths["data_path"],
        "embeddings_dir": os.path.join(paths["data_path"], "embeddings"),
        "hypernetwork_dir": os.path.join(models, "hypernetworks"),
        "lora_dir": os.path.join(models, "Lora"),
        "lyco_dir_backcompat": os.path.join(models, "LyCORIS"),
        "ui_settings_file": os.path.join(paths["data_path"], "config.json"),
        "ui_config_file": os.path.join(paths["data_path"], "ui-config.json"),
        "ckpt": paths["sd_model_file"],
        "config": paths["sd_default_config"],
    }
    for key, value in derived.items():
        if models_dir_given or getattr(opts, key, None) is None:
            setattr(opts, key, value)
    if models_dir_given:
        opts.models_dir = paths["models_path"] if paths["models_path"] != os.path.join(paths["data_path"], "models") else None

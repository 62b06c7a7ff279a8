"""Fake of ``modules/shared.py`` (with the ``shared_init``/``shared_items`` parts it gets at startup).

``opts``, ``state``, ``cmd_opts`` exist at import. ``sd_model`` is a module property backed by
``sd_models.model_data`` as in the real WebUI (no lazy loading: it is ``None`` until a test assigns
a model, e.g. ``shared.sd_model = tiny_model.build_tiny_sd_model()``).
"""
from __future__ import annotations

import os
import sys
import types
from collections import namedtuple

from modules import options, shared_cmd_options, shared_options, shared_state
from modules.paths_internal import (  # noqa: F401
    data_path, default_sd_model_file, extensions_builtin_dir, extensions_dir, models_path, script_path,
    sd_configs_path, sd_default_config, sd_model_file,
)

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

batch_cond_uncond = True  # old field, unused (the option is opts.batch_cond_uncond)
parallel_processing_allowed = True
styles_filename = [os.path.join(data_path, "styles.csv")]
config_filename = cmd_opts.ui_settings_file
hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}

demo = None
weight_load_location: str | None = None
xformers_available = False
hypernetworks: dict = {}
loaded_hypernetworks: list = []
prompt_styles = None
interrogator = None
face_restorers: list = []
settings_components: dict | None = None
tab_names: list[str] = []
clip_model = None
progress_print_out = sys.stdout
mem_mon = None
hf_endpoint = os.getenv("HF_ENDPOINT", "https://huggingface.co")

options_templates = shared_options.options_templates
restricted_opts = shared_options.restricted_opts
opts = options.Options(options_templates, restricted_opts)
state = shared_state.State()

options_section = options.options_section
OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}

UpscalerData = namedtuple("UpscalerData", ["name", "scaler", "data_path"])
sd_upscalers = [UpscalerData(name, None, None) for name in ("None", "Lanczos", "Nearest")]
"""Only the PIL-based upscalers exist in the stub (see ``images.resize_image``)."""


class TotalTQDM:
    """The console-wide progress bar; counts only."""

    def __init__(self):
        self.total = 0
        self.done = 0

    def reset(self) -> None:
        self.done = 0

    def update(self) -> None:
        self.done += 1

    def updateTotal(self, new_total: int) -> None:  # noqa: N802 (real name)
        self.total = new_total

    def clear(self) -> None:
        self.done = 0


total_tqdm = TotalTQDM()


def list_checkpoint_tiles(use_short: bool = False) -> list[str]:
    from modules import sd_models
    return [x.short_title if use_short else x.title for x in sd_models.checkpoints_list.values()]


def refresh_checkpoints() -> None:
    """Checkpoints are registered by tests (``sd_models.CheckpointInfo(...).register()``)."""


class Shared(types.ModuleType):
    """Gives the module a ``sd_model`` property, as ``shared_items.Shared`` does in the WebUI."""

    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value) -> None:
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared

device = None
"""``devices.device``; assigned by ``modules.devices`` when it is imported (below), as shared_init does."""

import modules.devices  # noqa: E402,F401  (reads cmd_opts from this module, then sets shared.device)

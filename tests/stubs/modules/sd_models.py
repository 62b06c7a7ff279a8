"""Fake of ``modules/sd_models.py``: checkpoint records and the loaded-model holder.

``model_data`` holds the current model (``shared.sd_model`` reads and writes it); there is no lazy
loading - tests assign a model built by ``tiny_model.build_tiny_sd_model`` (the driver does this and
fires ``model_loaded_callback`` like ``load_model``). ``reload_model_weights`` is a no-op that
returns the current model. ``CheckpointInfo`` takes an optional keyword ``sha256`` (the real one
reads it from the hash cache) and needs no file on disk.
"""
from __future__ import annotations

import enum
import os
import re
import threading

import torch

from modules import devices, paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict[str, "CheckpointInfo"] = {}
checkpoint_aliases: dict[str, "CheckpointInfo"] = {}
checkpoint_alisases = checkpoint_aliases  # the real module keeps this misspelt alias too
checkpoints_loaded: dict = {}


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def model_hash(filename: str) -> str:
    """Old 8-hex-digit hash of 64 KiB at offset 1 MiB; "NOFILE" when the file does not exist."""
    import hashlib
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


class CheckpointInfo:
    def __init__(self, filename: str, *, sha256: str | None = None):
        self.filename = filename
        abspath = os.path.abspath(filename)
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        name = abspath.replace(model_path, "") if abspath.startswith(model_path) else os.path.basename(filename)
        name = name.lstrip("\\/")
        self.metadata: dict = {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = sha256
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]", f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self) -> str | None:
        return self.shorthash


def setup_model() -> None:
    os.makedirs(model_path, exist_ok=True)


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models() -> None:
    """Checkpoints are registered explicitly by tests."""


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string: str) -> CheckpointInfo | None:  # sic: real name
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted((x for x in checkpoints_list.values() if search_string in x.title), key=lambda x: len(x.title))
    if found:
        return found[0]
    stripped = re.sub(re_strip_checksum, "", search_string)
    found = sorted((x for x in checkpoints_list.values() if stripped in x.title), key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint() -> CheckpointInfo | None:
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    return next(iter(checkpoints_list.values()), None)


def get_state_dict_from_checkpoint(pl_sd: dict) -> dict:
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    return pl_sd


def read_state_dict(checkpoint_file: str, print_global_state: bool = False, map_location: str | None = None) -> dict:
    """safetensors via ``safetensors.torch.load_file``, anything else via the restricted ``safe.load``."""
    _, extension = os.path.splitext(checkpoint_file)
    device = map_location or devices.get_optimal_device_name()
    if extension.lower() == ".safetensors":
        import safetensors.torch
        return get_state_dict_from_checkpoint(safetensors.torch.load_file(checkpoint_file, device=device))
    from modules import safe
    return get_state_dict_from_checkpoint(safe.load(checkpoint_file, map_location=device))


class SkipWritingToConfig:
    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models: list = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v, already_loaded: bool = False) -> None:
        self.sd_model = v
        if v in self.loaded_sd_models:
            self.loaded_sd_models.remove(v)
        if v is not None:
            self.loaded_sd_models.insert(0, v)
            self.was_loaded_at_least_once = True


model_data = SdModelData()


def get_empty_cond(sd_model) -> torch.Tensor:
    d = sd_model.get_learned_conditioning([""])
    return d["crossattn"] if isinstance(d, dict) else d


def send_model_to_cpu(m) -> None:
    if m is not None:
        m.to(devices.cpu)
    devices.torch_gc()


def model_target_device(m) -> torch.device:
    return devices.device


def send_model_to_device(m) -> None:
    m.to(shared.device)


def send_model_to_trash(m) -> None:
    m.to(device="meta")
    devices.torch_gc()


def load_model(checkpoint_info: CheckpointInfo | None = None, already_loaded_state_dict=None):
    raise NotImplementedError("the stub WebUI loads no checkpoints; assign shared.sd_model = build_tiny_sd_model()")


def reload_model_weights(sd_model=None, info: CheckpointInfo | None = None, forced_reload: bool = False):
    """No-op: the current model stays loaded (the real one swaps weights when the checkpoint changed)."""
    return model_data.sd_model


def unload_model_weights(sd_model=None, info=None):
    return model_data.sd_model


def apply_token_merging(sd_model, token_merging_ratio: float) -> None:
    """Token merging (tomesd) is not available in the stub."""


def apply_alpha_schedule_override(sd_model, p=None) -> None:
    """The zero-terminal-SNR / downcast-alphas options are not modelled."""


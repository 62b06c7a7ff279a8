"""The command line's options, generated from ``TrainConfig`` and its method configs so they never drift.

Every ``TrainConfig`` field is ``--field-name`` (``dataset_dir``/``output_dir``/``output_name`` are
``--dataset``/``--output-dir``/``--name``); method fields carry their prefix (``--lora-rank``,
``--t2i-condition``, ``--ip-projection``). Booleans get ``--x``/``--no-x``; enums list their values;
optional numbers accept ``none``. ``--config file.json`` holds the same names as JSON keys (method
settings nested under "lora", "t2i", "ip"); flags given on the command line win over the file.
Nothing here runs at import: ``build_parser()`` and ``config_from_args()`` are called by ``cli.main``.
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path

from ..errors import InputError, MissingFileError
from .config import ENUM_CHOICES, IPAdapterConfig, LoraConfig, T2IConfig, TrainConfig

_RENAMED = {"dataset_dir": "dataset", "output_dir": "output-dir", "output_name": "name"}
_NESTED = {"lora": LoraConfig, "t2i": T2IConfig, "ip": IPAdapterConfig}


def _optional(converter):
    def convert(text: str):
        return None if text.strip().lower() in ("", "none", "null") else converter(text)

    convert.__name__ = getattr(converter, "__name__", "value")
    return convert


def _option_kwargs(hint, default, members=None) -> dict:
    """argparse keyword arguments for a field of type ``hint``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return dict(nargs="*", type=Path if item is Path else str, metavar="VALUE")
    if base is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(base, type) and issubclass(base, Enum):
        values = [e.value for e in (members or base)]
        return dict(choices=values, metavar="{" + ",".join(values) + "}")
    converter = {int: int, float: float, str: str, Path: Path}.get(base, str)
    return dict(type=_optional(converter) if optional else converter, metavar=converter.__name__.upper())


def _help(default) -> str:
    if default is MISSING:
        return "required"
    value = default.value if isinstance(default, Enum) else default
    return f"default: {value if value not in ((), None) else 'none'}"


def _add_fields(group, cls, prefix: str, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + _RENAMED.get(f.name, f.name)).replace("_", "-")
        dest = f"{prefix}{f.name}"
        default = f.default if f.default is not MISSING else MISSING
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=_help(default),
                           **_option_kwargs(hints[f.name], default, ENUM_CHOICES.get(f.name)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_adapters.training",
        description="Train a LoRA (or a T2I-/IP-Adapter) on a folder of images with captions, headless. With no "
                    "--checkpoint it trains the built-in tiny model offline (a quick check of the whole pipeline).")
    model = parser.add_argument_group("model and run")
    model.add_argument("--checkpoint", type=Path, help="a diffusers-format folder, or an SD1.x/SD2.x/SDXL "
                       ".safetensors/.ckpt file; default: the built-in tiny model")
    model.add_argument("--tokenizer", type=Path, help="single files: a folder with the CLIP tokenizer's vocab.json "
                       "and merges.txt; default: the local Hugging Face cache (openai/clip-vit-large-patch14)")
    model.add_argument("--prediction-type", choices=["eps", "v"], help="override the model's prediction type "
                       "(single-file SD2.x defaults to v; SD2 512-base needs eps)")
    model.add_argument("--config", type=Path, help="a JSON file with any of the settings below (flags win)")
    model.add_argument("--resume", nargs="?", const="latest", metavar="STATE",
                       help="continue from a checkpoint's .state file, or with no value from the newest one of --name")
    model.add_argument("--overwrite", action="store_true", help="replace an existing <output-dir>/<name>.safetensors "
                       "written by another run (without it such a run is refused, exit 2)")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    model.add_argument("--log-every", type=int, default=1, metavar="N", help="print progress every N steps")
    _add_fields(parser.add_argument_group("training (TrainConfig)"), TrainConfig, "", tuple(_NESTED))
    for name, cls in _NESTED.items():
        _add_fields(parser.add_argument_group(f"{name} method ({cls.__name__})"), cls, f"{name}_")
    return parser


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"the config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"the config file {path} must hold a JSON object of settings")
    return data


def _check_keys(values: dict, cls, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig``: dataclass defaults, then ``--config``'s JSON, then the flags given."""
    values = _read_json(args.config) if getattr(args, "config", None) else {}
    _check_keys(values, TrainConfig, str(args.config))
    nested = {name: dict(values.pop(name, None) or {}) for name in _NESTED}
    for name, cls in _NESTED.items():
        _check_keys(nested[name], cls, f"{args.config} ({name!r})")
    given = vars(args)
    for f in fields(TrainConfig):
        if f.name in given and f.name not in _NESTED:
            values[f.name] = given[f.name]
    for name, cls in _NESTED.items():
        for f in fields(cls):
            if f"{name}_{f.name}" in given:
                nested[name][f.name] = given[f"{name}_{f.name}"]
    missing = [flag for field_name, flag in _RENAMED.items() if field_name not in values]
    if missing:
        raise InputError("missing " + ", ".join(f"--{m}" for m in missing) + " (or the same keys in --config)")
    try:
        for name, cls in _NESTED.items():
            values[name] = cls(**nested[name])
        return TrainConfig(**values)
    except TypeError as exc:  # a JSON value of the wrong shape
        raise InputError(f"bad settings: {exc}") from None

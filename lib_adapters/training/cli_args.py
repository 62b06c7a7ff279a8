"""The command line's options, generated from the request schema (``request.REQUEST_FIELDS``, itself generated from
the config dataclasses), so the flags, the ``--config`` file, the web API's body and the tab never drift apart.

Every request field is ``--field-name`` (``--rank``, ``--lora-targets``, ``--t2i-condition``, ``--ip-projection``,
``--overwrite``); earlier spellings stay accepted (``--dataset``, ``--name``, ``--lora-rank``, ...). Booleans get
``--x``/``--no-x``; enums list their values; optional values accept ``none``. ``--config file.json`` holds a request
as the web API takes it (``POST /adapters/v1/train``'s body is a valid file); flags given on the command line win
over the file. Where things are (the model, the output folder, the encoder, annotator and face model folders) are
flags only.
Nothing here runs at import: ``build_parser()`` and ``request_from_args()`` are called by ``cli.main``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING
from pathlib import Path

from ..errors import InputError, MissingFileError
from ..face.discovery import face_models_root
from .request import FIELDS, REQUEST_FIELDS, FilePlaces, Kind, RequestField, TrainRequest


def _optional(converter):
    def convert(text: str):
        return None if text.strip().lower() in ("", "none", "null") else converter(text)

    convert.__name__ = getattr(converter, "__name__", "value")
    return convert


def _option_kwargs(f: RequestField) -> dict:
    """argparse keyword arguments for a request field."""
    if f.kind is Kind.STRS:
        return dict(nargs="*", metavar="VALUE")
    if f.kind is Kind.BOOL:
        return dict(action=argparse.BooleanOptionalAction)
    if f.choices:
        return dict(choices=list(f.choices), metavar="{" + ",".join(f.choices) + "}")
    converter = {Kind.INT: int, Kind.FLOAT: float, Kind.STR: str}[f.kind.base]
    metavar = "PATH" if f.is_path or f.file else converter.__name__.upper()
    return dict(type=_optional(converter) if f.kind.optional else converter, metavar=metavar)


def _help(f: RequestField) -> str:
    parts = [f.label.split(" (")[0] if f.label else ""]
    if f.help:
        parts.append(f.help)
    if f.default is MISSING:
        parts.append("required (or in --config)")
    else:
        default = f.default if f.default not in ((), "", None) else "none"
        parts.append(f"default: {default}" + (f" ({f.none})" if f.none and default == "none" else ""))
    return "; ".join(p for p in parts if p)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_adapters.training",
        description="Train a LoRA (or a T2I-/IP-Adapter) on a folder of images with captions, headless. With no "
                    "--checkpoint it trains the built-in tiny model offline (a quick check of the whole pipeline).")
    model = parser.add_argument_group("model, files and run")
    model.add_argument("--checkpoint", type=Path, help="a diffusers-format folder, or an SD1.x/SD2.x/SDXL "
                       ".safetensors/.ckpt file; default: the built-in tiny model")
    model.add_argument("--tokenizer", type=Path, help="single files: a folder with the CLIP tokenizer's vocab.json "
                       "and merges.txt; default: the local Hugging Face cache (openai/clip-vit-large-patch14)")
    model.add_argument("--prediction-type", choices=["eps", "v"], help="override the model's prediction type "
                       "(single-file SD2.x defaults to v; SD2 512-base needs eps)")
    model.add_argument("--output-dir", type=Path, help="where <name>.safetensors, its checkpoints, samples and "
                       "caches go (required)")
    model.add_argument("--ip-encoder-folders", type=Path, nargs="*", default=(), metavar="DIR",
                       help="folders where --ip-image-encoder names (and the released adapters' encoder) are found")
    model.add_argument("--t2i-preprocessor-weights-dir", type=Path, metavar="DIR",
                       help="the annotator weights folder of --t2i-preprocessor")
    model.add_argument("--ip-face-models", type=Path, metavar="DIR",
                       help="FaceID: the folder of insightface's model packs (DIR/buffalo_l/...); default: the "
                       "WebUI's models/insightface/models when this extension is installed in one, else "
                       "~/.insightface/models")
    model.add_argument("--config", type=Path, help="a JSON file with any of the settings below, as the web API's "
                       "body (POST /adapters/v1/train) holds them; flags win")
    model.add_argument("--resume", nargs="?", const="latest", metavar="STATE",
                       help="continue from a checkpoint's .state file, or with no value from the newest one of "
                       "the name")
    model.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    model.add_argument("--log-every", type=int, default=1, metavar="N", help="print progress every N steps")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in REQUEST_FIELDS:
        title = f"{f.method.value} method" if f.method is not None else "training"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        group.add_argument(_flag(f.name), *f.aliases, dest=f.name, default=argparse.SUPPRESS, help=_help(f),
                           **_option_kwargs(f))
    return parser


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"the config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"the config file {path} must hold a JSON object of settings, as the web API's body")
    return data


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """The run's request: ``--config``'s JSON, then the flags given; checked as the web API checks a body."""
    values = _read_json(args.config) if getattr(args, "config", None) else {}
    earlier = sorted(k for k in ("output_dir", "lora", "t2i", "ip") if k in values)
    if earlier:  # the nested form of earlier versions
        raise InputError(f"{args.config} holds {', '.join(earlier)}: a config file holds a request as the web API "
                         "takes it, with flat names (rank, lora_targets, t2i_condition, ip_projection, ...), and the "
                         "output folder is --output-dir")
    given = vars(args)
    values.update({f.name: given[f.name] for f in REQUEST_FIELDS if f.name in given})
    missing = [_flag(f) for f in ("dataset_dir", "output_name") if values.get(f) in (None, "")]
    if missing and set(values) <= set(FIELDS):  # (unknown keys are said first, by from_dict)
        raise InputError("missing " + " and ".join(missing) + " (or the same keys in --config)")
    try:
        return TrainRequest.from_dict(values)
    except InputError as exc:
        where = f" (in {args.config} or the flags)" if getattr(args, "config", None) else ""
        raise InputError(f"{exc}{where}") from None


def default_face_models() -> Path | None:
    """Where insightface's packs are when ``--ip-face-models`` is not given: the WebUI's models/insightface/models when
    this extension is installed in a WebUI (``<webui>/extensions/<it>/``), else insightface's own
    ``~/.insightface/models``; None when neither folder exists (a FaceID run then says what to give)."""
    extension = Path(__file__).resolve().parents[2]
    candidates = [face_models_root(extension.parents[1] / "models")] if extension.parent.name == "extensions" else []
    candidates.append(Path.home() / ".insightface" / "models")
    return next((c for c in candidates if c.is_dir()), None)


def places_from_args(args: argparse.Namespace) -> FilePlaces:
    """Files named by path; encoders also by name in --ip-encoder-folders; face models in --ip-face-models."""
    return FilePlaces(encoder_dirs=tuple(args.ip_encoder_folders or ()),
                      annotator_dir=args.t2i_preprocessor_weights_dir,
                      face_models_dir=args.ip_face_models or default_face_models())

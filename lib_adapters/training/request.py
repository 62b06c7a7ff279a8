"""``TrainRequest``: one run's settings as the tab, the web API and the command line's ``--config`` give them,
generated from the config dataclasses (``config.py``), so the three never disagree.

The request is flat, so that an API body stays one readable object: ``REQUEST_FIELDS`` lists every field of
``TrainConfig`` and of its method configs (``LoraConfig``, ``T2IConfig``, ``IPAdapterConfig``) except the places a
front end fills in (the output folder, the encoder, annotator and face model folders), under its request name: the
shared settings by their own names, each method's knobs with its prefix (``rank``/``alpha``/``lora_targets``/
``train_text_encoder``/``text_encoder_lr`` for LoRA, ``t2i_*``, ``ip_*``), plus ``overwrite``, which is about the
job, not the training. Each field has one JSON kind (``Kind``) and one default, the config's. A request that sets
another method's knob to a non-default value is refused rather than silently ignoring it. ``from_dict`` checks
names and JSON types; ``to_config`` checks every range and choice through the configs and names the request field
at fault.

File fields (``t2i_init_from``, ``ip_init_from``, ``ip_image_encoder``) take a path, or a name as the Adapters
panel lists it (``"name"`` or ``"name [hash]"``; encoders by file name in the encoder folders): ``FilePlaces``
(made by the front end) resolves them. Empty means "none": start from scratch, or the encoder the released
adapters use, found as the panel finds it.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, fields, make_dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

from ..catalog import EncoderCatalog
from ..errors import InputError, MissingFileError
from .config import (IPAdapterConfig, LoraConfig, Method, SettingError, T2IConfig, TrainConfig, choice, field_types,
                     knob_of)


class Kind(str, Enum):
    """The JSON kind of a request field, as its messages and the API's schema name it."""

    INT = "an integer"
    FLOAT = "a number"
    BOOL = "true or false"
    STR = "a string"
    STRS = "a list of strings"
    OPT_INT = "an integer or null"
    OPT_FLOAT = "a number or null"
    OPT_STR = "a string or null"

    @property
    def optional(self) -> bool:
        return self in (Kind.OPT_INT, Kind.OPT_FLOAT, Kind.OPT_STR)

    @property
    def base(self) -> "Kind":
        """The kind without "or null"."""
        return {Kind.OPT_INT: Kind.INT, Kind.OPT_FLOAT: Kind.FLOAT, Kind.OPT_STR: Kind.STR}.get(self, self)

    @property
    def python_type(self) -> Any:
        """The Python type of its values (for the API's OpenAPI model)."""
        base = {Kind.INT: int, Kind.FLOAT: float, Kind.BOOL: bool, Kind.STR: str, Kind.STRS: List[str]}[self.base]
        return Optional[base] if self.optional else base


# The method configs, their TrainConfig field, the owning method, the request prefix and how messages name them.
PARTS = {"lora": (LoraConfig, Method.LORA, "lora_", "LoRA"),
         "t2i": (T2IConfig, Method.T2I_ADAPTER, "t2i_", "T2I-Adapter"),
         "ip": (IPAdapterConfig, Method.IP_ADAPTER, "ip_", "IP-Adapter")}
METHOD_LABELS = {method: label for _, method, _, label in PARTS.values()}
REQUIRED = ("dataset_dir", "output_name")


@dataclass(frozen=True)
class RequestField:
    """One field of the flat request: where it lives in the configs, its JSON kind and default, who owns it."""

    name: str  # in the request, the API body, --config JSON; the flag is --name-with-dashes
    part: str | None  # None: TrainConfig itself; "lora", "t2i", "ip": that method config; "job": about the job
    attr: str  # the config field
    kind: Kind
    default: Any  # the JSON value (MISSING: required)
    method: Method | None  # the method whose knob it is (None: every method's)
    label: str = ""
    help: str = ""
    choices: tuple[str, ...] = ()  # the allowed strings (enums)
    low: float | None = None
    high: float | None = None
    none: str = ""  # what null/empty means
    tab: bool = True
    file: str = ""  # "adapter" | "encoder": resolved through FilePlaces
    aliases: tuple[str, ...] = ()
    is_path: bool = False  # the config holds a Path


def _kind(hint: Any) -> tuple[Kind, tuple[str, ...], bool]:
    """(JSON kind, choices, is a path) of a config field's type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(base) is tuple:
        return Kind.STRS, (), False
    if isinstance(base, type) and issubclass(base, Enum):
        return Kind.STR, tuple(e.value for e in base), False
    kind = {int: Kind.INT, float: Kind.FLOAT, bool: Kind.BOOL, str: Kind.STR, Path: Kind.STR}[base]
    if optional:
        kind = {Kind.INT: Kind.OPT_INT, Kind.FLOAT: Kind.OPT_FLOAT, Kind.STR: Kind.OPT_STR}[kind]
    return kind, (), base is Path


def _json_default(f, kind: Kind) -> Any:
    if f.default is MISSING:
        return MISSING
    value = f.default
    if isinstance(value, Enum):
        return value.value
    if value is None and kind is Kind.OPT_STR:
        return ""  # "" and null both mean none; the API documents ""
    return str(value) if isinstance(value, Path) else value


def _fields_of(cls: type, part: str | None, method: Method | None, prefix: str) -> list[RequestField]:
    out = []
    hints = field_types(cls)
    for f in fields(cls):
        k = knob_of(f)
        if k.place or f.name in PARTS:
            continue
        kind, choices, is_path = _kind(hints[f.name])
        out.append(RequestField(
            k.name or prefix + f.name, part, f.name, kind, _json_default(f, kind), method, k.label, k.help,
            tuple(c.value for c in k.choices) or choices, k.low, k.high, k.none, k.tab, k.file, k.aliases, is_path))
    return out


def _request_fields() -> tuple[RequestField, ...]:
    out = _fields_of(TrainConfig, None, None, "")  # the shared settings, then each method's knobs
    for part, (cls, method, prefix, _) in PARTS.items():
        out.extend(_fields_of(cls, part, method, prefix))
    out.append(RequestField("overwrite", "job", "overwrite", Kind.BOOL, False, None,
                            "Overwrite an existing file of this name",
                            "replace an existing <output_name>.safetensors that another run wrote"))
    return tuple(out)


REQUEST_FIELDS: tuple[RequestField, ...] = _request_fields()
FIELDS: dict[str, RequestField] = {f.name: f for f in REQUEST_FIELDS}


def method_fields(method: Method | str) -> tuple[str, ...]:
    """The request fields that are ``method``'s own knobs, in schema order."""
    method = Method(method)
    return tuple(f.name for f in REQUEST_FIELDS if f.method is method)


def shared_fields() -> tuple[str, ...]:
    """The request fields every method takes (``method`` itself included)."""
    return tuple(f.name for f in REQUEST_FIELDS if f.method is None)


@dataclass(frozen=True)
class FilePlaces:
    """Where a request's file names are looked up: the panel's adapter list and its encoder/annotator folders.
    The command line gives no adapter list (names are paths) and the folders of its flags."""

    resolve_adapter: Callable[[str], Path] = Path  # a name as the panel lists it ("name" or "name [hash]") -> its file
    encoder_dirs: tuple[Path, ...] = ()
    annotator_dir: Optional[Path] = None
    face_models_dir: Optional[Path] = None  # FaceID: insightface's packs as <it>/<pack>/ (models/insightface/models)

    def adapter(self, value: str, field: str) -> Path:
        path = Path(value).expanduser()
        if path.is_file():
            return path
        try:
            return self.resolve_adapter(value)
        except MissingFileError as exc:
            raise MissingFileError(f"{field}: {exc}") from None

    def encoder(self, value: str) -> Path:
        path = Path(value).expanduser()
        if path.is_file() or not self.encoder_dirs:  # no folders to look in: a path (checked before the run)
            return path
        files = EncoderCatalog(list(self.encoder_dirs)).refresh()
        for f in files:
            if value in (f.path.stem, f.path.name):
                return f.path
        listed = ", ".join(sorted(f.path.name for f in files)) or "none"
        raise MissingFileError(f"ip_image_encoder: no CLIP vision encoder {value!r} in "
                               f"{', '.join(map(str, self.encoder_dirs))} (found: {listed}); give a file name from "
                               "there or a full path, or leave it empty for the one the released adapters use")

    def resolve(self, f: RequestField, value: str) -> Path:
        return self.encoder(value) if f.file == "encoder" else self.adapter(value, f.name)


class _Request:
    """The behaviour of ``TrainRequest``; its fields are generated from the configs (``REQUEST_FIELDS``)."""

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in REQUEST_FIELDS if f.name not in REQUIRED}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainRequest":
        """Build from JSON-like data; ``InputError`` naming unknown, missing, misplaced or wrongly typed fields."""
        if not isinstance(data, dict):
            raise InputError(f"a training request must be a JSON object; got {type(data).__name__}")
        unknown = sorted(k for k in data if k not in FIELDS)
        if unknown:
            raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are: {', '.join(FIELDS)}")
        missing = [k for k in REQUIRED if data.get(k) in (None, "")]
        if missing:
            raise InputError(f"missing required field(s): {', '.join(missing)}")
        values, wrong = {}, []
        for name, value in data.items():
            ok, converted = _convert(FIELDS[name].kind, value)
            if not ok:
                wrong.append(f"{name} must be {FIELDS[name].kind.value}, got {value!r}")
            values[name] = converted
        if wrong:
            raise InputError("wrong type: " + "; ".join(wrong))
        _check_method_fields(values)
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sample_prompts"] = list(self.sample_prompts)
        return out

    def to_config(self, output_dir: Path | str, *, places: FilePlaces | None = None) -> TrainConfig:
        """The validated core config (``InputError`` naming the field on a bad value). Without ``places`` file
        fields are taken as paths and not looked up (a check of the request alone). Another method's knobs keep their
        defaults (``from_dict`` refused any other value)."""
        method = choice(Method, self.method, "method")
        values: dict[str | None, dict[str, Any]] = {None: {}, **{part: {} for part in PARTS}}
        for f in REQUEST_FIELDS:
            if f.part != "job" and f.method in (None, method):
                values[f.part][f.attr] = _config_value(f, getattr(self, f.name), places)
        if places is not None:
            values["t2i"]["preprocessor_weights_dir"] = places.annotator_dir
            values["ip"]["encoder_folders"] = places.encoder_dirs
            values["ip"]["face_models"] = places.face_models_dir
        parts = {part: _build(cls, values[part], part) for part, (cls, *_) in PARTS.items()}
        return _build(TrainConfig, dict(values[None], output_dir=Path(output_dir), **parts), None)


def _config_value(f: RequestField, value: Any, places: FilePlaces | None) -> Any:
    """A request value as the config takes it: "" -> None for optional strings, paths as ``Path``, file names
    resolved through ``places``."""
    if f.kind is Kind.OPT_STR and value in ("", None):
        return None
    if f.file and places is not None:
        return places.resolve(f, value)
    if f.is_path:
        return Path(value).expanduser()
    return tuple(value) if f.kind is Kind.STRS else value


def _build(cls: type, values: dict, part: str | None):
    """``cls(**values)``; a ``SettingError`` as an ``InputError`` naming the request field at fault, or for a bad
    combination of a method's settings, the method."""
    try:
        return cls(**values)
    except SettingError as exc:
        message = str(exc)
        names = [f.name for f in REQUEST_FIELDS if f.part == part and f.attr == exc.field]
        if names and not message.startswith(names[0]):
            message = f"{names[0]}: {message}"
        elif not names and part is not None:
            message = f"{PARTS[part][3]} settings: {message}"
        raise InputError(message) from None


def _check_method_fields(values: dict) -> None:
    """A knob of another method than the request's would be ignored: refuse it (defaults are fine)."""
    method = choice(Method, values.get("method", Method.LORA.value), "method")
    foreign = [name for name, value in values.items()
               if FIELDS[name].method not in (None, method) and value != FIELDS[name].default]
    if foreign:
        named = ", ".join(f"{n} ({METHOD_LABELS[FIELDS[n].method]})" for n in sorted(foreign))
        pronoun = "it" if len(foreign) == 1 else "them"
        raise InputError(f"method {method.value} does not take {named}; remove {pronoun}, or set method to the one "
                         "the field names belong to (fields are prefixed t2i_ and ip_)")


def _convert(kind: Kind, value):
    """(ok, value) for one JSON value of ``kind``; no silent float->int or str->number coercion."""
    is_bool = isinstance(value, bool)
    if kind.optional:
        if value is None:
            return True, "" if kind is Kind.OPT_STR else None
        return _convert(kind.base, value)
    if kind is Kind.INT:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, int) and not is_bool, value
    if kind is Kind.FLOAT:
        number = isinstance(value, (int, float)) and not is_bool
        return number, float(value) if number else value
    if kind is Kind.BOOL:
        return is_bool, value
    if kind is Kind.STR:
        return isinstance(value, str), value
    if isinstance(value, str):  # STRS: one prompt per line, as a textbox gives them
        value = [line.strip() for line in value.splitlines() if line.strip()]
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return ok, tuple(value) if ok else value


def _annotation(f: RequestField) -> Any:
    return {Kind.STRS: "tuple[str, ...]"}.get(f.kind, f.kind.python_type)


TrainRequest = make_dataclass(
    "TrainRequest",
    [(f.name, _annotation(f)) if f.default is MISSING else (f.name, _annotation(f), dataclass_field(default=f.default))
     for f in REQUEST_FIELDS],
    bases=(_Request,), frozen=True, namespace={"__module__": __name__})
TrainRequest.__doc__ = ("One run's settings as a UI, API client or --config file gives them (fields: REQUEST_FIELDS). "
                        "``to_config`` turns them into the core's config.")

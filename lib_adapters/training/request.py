"""``TrainRequest``: one training run's settings as the tab, the web API and scripts give them.

Plain JSON-able fields, flat so that an API body stays one readable object. The shared settings have
plain names; each method's own knobs carry its prefix (``rank``/``alpha``/``lora_targets``/
``train_text_encoder`` for LoRA, ``t2i_*`` for T2I-Adapters, ``ip_*`` for IP-Adapters), and a request
that sets another method's knob is refused rather than silently ignoring it. ``from_dict`` checks
names and JSON types; ``to_config`` checks every range and choice through the core's configs
(``TrainConfig``, ``T2IConfig``, ``IPAdapterConfig``) and names the request field at fault.

File fields (``t2i_init_from``, ``ip_init_from``, ``ip_image_encoder``) take a path, or a name as the
Adapters panel lists it (``"name"`` or ``"name [hash]"``; encoders by file name in models/clip_vision):
``FilePlaces`` (made by the host from the panel's folders) resolves them. Empty means "none": start
from scratch, or the encoder the released adapters use, found as the panel finds it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from ..catalog import EncoderCatalog
from ..errors import InputError, MissingFileError
from .config import IPAdapterConfig, LoraConfig, Method, T2IConfig, TrainConfig

log = logging.getLogger(__name__)

_INT, _FLOAT, _BOOL, _STR, _STRS, _OPT_FLOAT, _OPT_INT, _OPT_STR = (
    "an integer", "a number", "true or false", "a string", "a list of strings", "a number or null",
    "an integer or null", "a string or null")
_KINDS = {"int": _INT, "float": _FLOAT, "bool": _BOOL, "str": _STR, "tuple[str, ...]": _STRS,
          "Optional[float]": _OPT_FLOAT, "Optional[int]": _OPT_INT, "Optional[str]": _OPT_STR}

LORA_FIELDS = ("rank", "alpha", "lora_targets", "train_text_encoder")
T2I_FIELDS = ("t2i_adapter_kind", "t2i_condition", "t2i_condition_channels", "t2i_num_res_blocks", "t2i_preprocessor",
              "t2i_init_from", "t2i_timesteps", "t2i_export_layout")
IP_FIELDS = ("ip_projection", "ip_image_encoder", "ip_init_from", "ip_image_drop", "ip_text_drop", "ip_both_drop",
             "ip_cache_features", "ip_resampler_dim", "ip_resampler_depth", "ip_data_root")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {"lora": LORA_FIELDS, "t2i_adapter": T2I_FIELDS, "ip_adapter": IP_FIELDS}
_OWNER = {name: method for method, names in METHOD_FIELDS.items() for name in names}
_METHOD_LABELS = {"lora": "LoRA", "t2i_adapter": "T2I-Adapter", "ip_adapter": "IP-Adapter"}


@dataclass(frozen=True)
class FilePlaces:
    """Where a request's file names are looked up: the panel's adapter list and its encoder/annotator folders."""

    resolve_adapter: Callable[[str], Path]  # a name as the panel lists it ("name" or "name [hash]") -> its file
    encoder_dirs: tuple[Path, ...] = ()
    annotator_dir: Optional[Path] = None

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
        if path.is_file():
            return path
        files = EncoderCatalog(list(self.encoder_dirs)).refresh()
        for f in files:
            if value in (f.path.stem, f.path.name):
                return f.path
        listed = ", ".join(sorted(f.path.name for f in files)) or "none"
        raise MissingFileError(f"ip_image_encoder: no CLIP vision encoder {value!r} in "
                               f"{', '.join(map(str, self.encoder_dirs))} (found: {listed}); give a file name from "
                               "there or a full path, or leave it empty for the one the released adapters use")


@dataclass(frozen=True)
class TrainRequest:
    """One run's settings as a UI or API client gives them. ``to_config`` turns them into the core's config."""

    dataset_dir: str
    output_name: str
    method: str = "lora"
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    precision: str = "auto"  # bf16 on CUDA hosts (fp16 where bf16 is unsupported), fp32 on CPU
    seed: int = 0
    save_every: int = 500
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_image: Optional[str] = ""  # adapters: the samples' condition (T2I) or reference (IP); "": dataset's first
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    buckets: bool = True
    save_precision: str = "fp16"  # dtype of the published file's tensors (every method)
    overwrite: bool = False  # replace an existing published file of this name written by another run
    # LoRA
    rank: int = 16
    alpha: float = 16.0
    lora_targets: str = "attention"
    train_text_encoder: bool = False
    # T2I-Adapter: the dataset holds x.png, x.<t2i_condition>.png, x.txt (or is a TencentARC meta .txt)
    t2i_adapter_kind: str = "full"  # full or light
    t2i_condition: str = "depth"
    t2i_condition_channels: int = 3  # 1 for edges/sketches
    t2i_num_res_blocks: Optional[int] = None  # None: 2 (full) or 4 (light), as the released adapters
    t2i_preprocessor: Optional[str] = ""  # makes missing conditions (cached beside the dataset); "": all must exist
    t2i_init_from: Optional[str] = ""  # an adapter to fine-tune (panel name or path); "": from scratch
    t2i_timesteps: str = "uniform"  # or cubic (the SDXL recipe)
    t2i_export_layout: str = "tencentarc"  # or diffusers
    # IP-Adapter: the dataset is an image + caption folder or the reference's JSON list
    ip_projection: str = "plain"  # or plus (Resampler, 16 tokens)
    ip_image_encoder: Optional[str] = ""  # file in models/clip_vision or a path; "": the released adapters' one
    ip_init_from: Optional[str] = ""  # an IP-Adapter to fine-tune (panel name or path); "": from scratch
    ip_image_drop: float = 0.05
    ip_text_drop: float = 0.05
    ip_both_drop: float = 0.05
    ip_cache_features: bool = True
    ip_resampler_dim: Optional[int] = None  # plus only; None: 1280 on SDXL, else the context width
    ip_resampler_depth: int = 4
    ip_data_root: Optional[str] = ""  # images of a JSON list; "": the JSON file's folder

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        """Field name -> the JSON kind it takes (for messages and the API schema)."""
        return {f.name: _KINDS[str(f.type)] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.name not in ("dataset_dir", "output_name")}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainRequest":
        """Build from JSON-like data; ``InputError`` naming unknown, missing, misplaced or wrongly typed fields."""
        if not isinstance(data, dict):
            raise InputError(f"a training request must be a JSON object; got {type(data).__name__}")
        kinds = cls.field_kinds()
        unknown = sorted(k for k in data if k not in kinds)
        if unknown:
            raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are: {', '.join(kinds)}")
        missing = [k for k in ("dataset_dir", "output_name") if data.get(k) in (None, "")]
        if missing:
            raise InputError(f"missing required field(s): {', '.join(missing)}")
        values, wrong = {}, []
        for name, value in data.items():
            ok, converted = _convert(kinds[name], value)
            if not ok:
                wrong.append(f"{name} must be {kinds[name]}, got {value!r}")
            values[name] = converted
        if wrong:
            raise InputError("wrong type: " + "; ".join(wrong))
        _check_method_fields(values)
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sample_prompts"] = list(self.sample_prompts)
        return out

    def resolved_precision(self, device: torch.device | str | None = None) -> str:
        """"auto" -> bf16 on a CUDA device (fp16 if the GPU has no bf16), fp32 elsewhere."""
        if str(self.precision).lower() != "auto":
            return str(self.precision).lower()
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def to_config(self, output_dir: Path, *, device: torch.device | str | None = None,
                  places: FilePlaces | None = None) -> TrainConfig:
        """The validated core config (``InputError`` naming the field on a bad value). Without ``places`` file
        fields are taken as paths and not looked up (a check of the request alone)."""
        method = _method(self.method)
        lora = _method_config(LoraConfig, "LoRA", {
            "rank": ("rank", self.rank), "alpha": ("alpha", self.alpha), "lora_targets": ("targets", self.lora_targets),
            "train_text_encoder": ("train_text_encoder", self.train_text_encoder),
            "save_precision": ("save_precision", self.save_precision)})
        t2i = self._t2i(places) if method is Method.T2I_ADAPTER else T2IConfig()
        ip = self._ip(places) if method is Method.IP_ADAPTER else IPAdapterConfig()
        return TrainConfig(
            dataset_dir=Path(self.dataset_dir).expanduser(), output_dir=Path(output_dir), output_name=self.output_name,
            method=method, resolution=self.resolution, steps=self.steps, batch_size=self.batch_size,
            grad_accumulation=self.grad_accumulation, learning_rate=self.learning_rate, lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps, optimizer=self.optimizer, precision=self.resolved_precision(device),
            seed=self.seed, save_every=self.save_every, sample_every=self.sample_every,
            sample_prompts=tuple(self.sample_prompts), sample_seed=self.seed, sample_steps=self.sample_steps,
            sample_image=Path(self.sample_image).expanduser() if self.sample_image else None,
            min_snr_gamma=self.min_snr_gamma, noise_offset=self.noise_offset,
            gradient_checkpointing=self.gradient_checkpointing, buckets=self.buckets,
            cache_latents=self.cache_latents, lora=lora, t2i=t2i, ip=ip)

    def _t2i(self, places: FilePlaces | None) -> T2IConfig:
        init = self.t2i_init_from or None
        if init is not None:
            init = places.adapter(init, "t2i_init_from") if places is not None else Path(init).expanduser()
        return _method_config(T2IConfig, "T2I-Adapter", {
            "t2i_adapter_kind": ("adapter_kind", self.t2i_adapter_kind),
            "t2i_condition": ("condition", self.t2i_condition),
            "t2i_condition_channels": ("condition_channels", self.t2i_condition_channels),
            "t2i_num_res_blocks": ("num_res_blocks", self.t2i_num_res_blocks),
            "t2i_preprocessor": ("preprocessor", _preprocessor(self.t2i_preprocessor)),
            "t2i_init_from": ("init_from", init), "t2i_timesteps": ("timesteps", self.t2i_timesteps),
            "t2i_export_layout": ("export_layout", self.t2i_export_layout),
            "save_precision": ("save_precision", self.save_precision),
            "": ("preprocessor_weights_dir", places.annotator_dir if places is not None else None)})

    def _ip(self, places: FilePlaces | None) -> IPAdapterConfig:
        init, encoder = self.ip_init_from or None, self.ip_image_encoder or None
        if places is not None:
            init = places.adapter(init, "ip_init_from") if init is not None else None
            encoder = places.encoder(encoder) if encoder is not None else None
        return _method_config(IPAdapterConfig, "IP-Adapter", {
            "ip_projection": ("projection", self.ip_projection), "ip_image_encoder": ("image_encoder", encoder),
            "ip_init_from": ("init_from", init), "ip_image_drop": ("image_drop", self.ip_image_drop),
            "ip_text_drop": ("text_drop", self.ip_text_drop), "ip_both_drop": ("both_drop", self.ip_both_drop),
            "ip_cache_features": ("cache_features", self.ip_cache_features),
            "ip_resampler_dim": ("resampler_dim", self.ip_resampler_dim),
            "ip_resampler_depth": ("resampler_depth", self.ip_resampler_depth),
            "ip_data_root": ("data_root", Path(self.ip_data_root).expanduser() if self.ip_data_root else None),
            "save_precision": ("save_precision", self.save_precision),
            "": ("encoder_folders", places.encoder_dirs if places is not None else ())})


def _preprocessor(value: str | None) -> str | None:
    """"" and the panel's "none" both mean no preprocessor: "none" would make each condition a copy of its image."""
    name = (value or "").strip()
    return None if name.lower() in ("", "none") else name


def _method(value: str) -> Method:
    try:
        return Method(str(value).lower())
    except ValueError:
        raise InputError(f"method must be one of {', '.join(m.value for m in Method)}; got {value!r}") from None


def _check_method_fields(values: dict) -> None:
    """A knob of another method than the request's would be ignored: refuse it (defaults are fine)."""
    method = str(values.get("method", "lora")).lower()
    if method not in METHOD_FIELDS:
        _method(method)
    defaults = TrainRequest.defaults()
    foreign = [name for name, value in values.items()
               if _OWNER.get(name, method) != method and value != defaults[name]]
    if foreign:
        named = ", ".join(f"{n} ({_METHOD_LABELS[_OWNER[n]]})" for n in sorted(foreign))
        raise InputError(f"method {method} does not take {named}; remove {'it' if len(foreign) == 1 else 'them'}, "
                         "or set method to the one the field names belong to (fields are prefixed t2i_ and ip_)")


def _method_config(cls, label: str, spec: dict[str, tuple[str, object]]):
    """``cls(**values)``; on a bad value, ``InputError`` naming the request field(s) at fault (each value is tried
    alone against the defaults to find them; a bad combination is named as the method's settings)."""
    values = {name: value for name, value in spec.values()}
    try:
        return cls(**values)
    except InputError as exc:
        culprits = []
        for field_name, (name, value) in spec.items():
            try:
                cls(**{name: value})
            except InputError as single:
                culprits.append(f"{field_name or name}: {single}")
        raise InputError("; ".join(culprits) if culprits else f"{label} settings: {exc}") from None


def _convert(kind: str, value):
    """(ok, value) for one JSON value of ``kind``; no silent float->int or str->number coercion."""
    is_bool = isinstance(value, bool)
    if kind in (_OPT_FLOAT, _OPT_INT, _OPT_STR):
        if value is None:
            return True, "" if kind == _OPT_STR else None
        return _convert({_OPT_FLOAT: _FLOAT, _OPT_INT: _INT, _OPT_STR: _STR}[kind], value)
    if kind == _INT:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, int) and not is_bool, value
    if kind == _FLOAT:
        return isinstance(value, (int, float)) and not is_bool, float(value) if not is_bool and isinstance(
            value, (int, float)) else value
    if kind == _BOOL:
        return is_bool, value
    if kind == _STR:
        return isinstance(value, str), value
    if kind == _STRS:
        if isinstance(value, str):  # one prompt per line, as a textbox gives them
            value = [line.strip() for line in value.splitlines() if line.strip()]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else value
    return False, value

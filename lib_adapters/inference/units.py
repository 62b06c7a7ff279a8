"""A unit of the Adapters panel, validated once at the boundary (UI, API, infotext).

``AdapterUnit.from_value`` accepts what the WebUI hands a script: a unit object, a dict with named
fields (the API's JSON), or a positional list in ``FIELD_ORDER``. Unknown fields and out-of-range
values raise ``InputError`` with the valid choices.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from ..errors import InputError
from ..models.clip_vision import CropMode
from ..preprocess.resize import ResizeMode
from .blocks import BlockPreset


class ControlMode(str, Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    ADAPTER = "Adapter is more important"

    @classmethod
    def parse(cls, value: Any) -> "ControlMode":
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(cls):
            return list(cls)[value]
        if isinstance(value, str):
            for mode in cls:
                if value.strip().lower() in (mode.value.lower(), mode.name.lower()):
                    return mode
            if "controlnet is more important" in value.lower():  # sd-webui-controlnet's wording
                return cls.ADAPTER
        raise InputError(f"control_mode {value!r} is not one of: {', '.join(m.value for m in cls)}")


class MultiImage(str, Enum):
    """How an IP unit's several reference images combine."""

    AVERAGE = "Average"  # one set of tokens: the mean over reference images
    CONCAT = "Concatenate"  # N sets of tokens side by side


NO_MODEL = "None"
WEIGHT_LIMIT = 10.0  # |weight|, |composition_weight|, ... beyond this only make noise (the UI offers 0-2)
LARGEST_FACE = -1  # face_index: the largest face rather than the n-th from the left
MAX_FACE_INDEX = 99
_ALIASES = {"guidance_start": "start", "guidance_end": "end", "module": "preprocessor",
            "processor_res": "resolution", "input_image": "image"}


@dataclass(frozen=True)
class AdapterUnit:
    enabled: bool = False
    model: str = NO_MODEL
    preprocessor: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    resolution: int = 512
    threshold_a: float = -1.0  # -1: the preprocessor's default
    threshold_b: float = -1.0
    image: Any = None  # anything preprocess.resize.to_hwc_uint8 accepts, or a list of them (IP units)
    # IP-Adapter units only (the model file decides the unit's kind):
    block_preset: BlockPreset = BlockPreset.ALL
    composition_weight: float = 1.0  # with "Style and composition": factor of the layout blocks
    multi_image: MultiImage = MultiImage.AVERAGE
    crop: CropMode = CropMode.CENTER
    mask: Any = None  # optional image: white where the image prompt acts, black where it does not
    # IP-Adapter FaceID units only:
    face_index: int = LARGEST_FACE  # which face: -1 the largest, else the n-th from the left (from 0)
    face_pack: str = ""  # insightface model pack folder (buffalo_l, antelopev2); "": the one in Settings
    faceid_lora: bool = True  # apply the LoRA that goes with the model for the generation
    faceid_lora_weight: float = 1.0  # its strength (1: as trained), independent of the unit's weight
    s_scale: float = 1.0  # FaceID Plus v2: weight of the face structure CLIP sees (the reference's s_scale)

    @property
    def is_active(self) -> bool:
        return self.enabled and self.model != NO_MODEL and self.weight != 0.0

    @classmethod
    def from_value(cls, value: Any) -> "AdapterUnit":
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (list, tuple)):
            if len(value) > len(FIELD_ORDER):
                raise InputError(f"a unit list has at most {len(FIELD_ORDER)} values ({', '.join(FIELD_ORDER)})")
            return cls.from_dict(dict(zip(FIELD_ORDER, value)))
        if hasattr(value, "__dict__"):  # another extension's unit object with the same field names
            return cls.from_dict({k: v for k, v in vars(value).items() if not k.startswith("_")}, strict=False)
        raise InputError(f"an adapter unit must be a JSON object or a list, not {type(value).__name__}")

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True) -> "AdapterUnit":
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = _ALIASES.get(key, key)
            if name in known:
                values[name] = value
            elif strict:
                raise InputError(f"unknown adapter unit field '{key}'; valid fields: {', '.join(FIELD_ORDER)}")
        return cls(**values)

    def __post_init__(self) -> None:
        """Coerce UI/API/infotext types (strings, ints) and check ranges; frozen, so via __setattr__."""
        try:
            coerced = {
                "enabled": _as_bool(self.enabled),
                "model": str(self.model or NO_MODEL),
                "preprocessor": str(self.preprocessor or "none"),
                "weight": float(self.weight),
                "start": float(self.start),
                "end": float(self.end),
                "control_mode": ControlMode.parse(self.control_mode),
                "resize_mode": ResizeMode.parse(self.resize_mode),
                "resolution": int(self.resolution),
                "threshold_a": float(self.threshold_a),
                "threshold_b": float(self.threshold_b),
                "block_preset": BlockPreset.parse(self.block_preset),
                "composition_weight": float(self.composition_weight),
                "multi_image": _parse_enum(MultiImage, self.multi_image, "multi_image"),
                "crop": CropMode.parse(self.crop),
                "face_index": _as_int(self.face_index, "face_index"),
                "face_pack": str(self.face_pack or "").strip(),
                "faceid_lora": _as_bool(self.faceid_lora),
                "faceid_lora_weight": float(self.faceid_lora_weight),
                "s_scale": float(self.s_scale),
            }
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid adapter unit value: {exc}") from exc
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InputError(f"start ({self.start}) and end ({self.end}) must satisfy 0 <= start <= end <= 1")
        # NaN fails every comparison, so these also refuse NaN and infinities
        for name in ("weight", "composition_weight", "faceid_lora_weight", "s_scale"):
            if not -WEIGHT_LIMIT <= getattr(self, name) <= WEIGHT_LIMIT:
                raise InputError(f"{name} {getattr(self, name)} is outside [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}]")
        for name in ("threshold_a", "threshold_b"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name} {getattr(self, name)} is not a finite number (-1: the preprocessor's default)")
        if not 64 <= self.resolution <= 4096:
            raise InputError(f"resolution {self.resolution} is outside [64, 4096]")
        if not LARGEST_FACE <= self.face_index <= MAX_FACE_INDEX:
            raise InputError(f"face_index {self.face_index} is outside [{LARGEST_FACE}, {MAX_FACE_INDEX}] "
                             f"({LARGEST_FACE}: the largest face, 0: the leftmost, 1: the next, ...)")
        if any(c in self.face_pack for c in "/\\:") or self.face_pack in (".", ".."):
            raise InputError(f"face_pack {self.face_pack!r} must be the name of a folder in "
                             "models/insightface/models (buffalo_l, antelopev2), not a path")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("control_mode", "resize_mode", "block_preset", "multi_image", "crop"):
            data[name] = getattr(self, name).value
        return data

    @property
    def images(self) -> list[Any]:
        """The unit's reference images as a list (empty when none was given)."""
        if self.image is None:
            return []
        if isinstance(self.image, (list, tuple)):
            return [i for i in self.image if i is not None]
        return [self.image]


def _parse_enum(enum: type[Enum], value: Any, name: str) -> Any:
    for member in enum:
        if value is member or (isinstance(value, str) and value.strip().lower() in
                               (member.value.lower(), member.name.lower())):
            return member
    raise InputError(f"{name} {value!r} is not one of: {', '.join(m.value for m in enum)}")


def _as_int(value: Any, name: str) -> int:
    """An integer from the UI (a float slider value), the API or infotext ("2", "2.0"); 2.5 is refused."""
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} {value!r} is not a whole number")
    return int(number)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if value.strip().lower() in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"'{value}' is not a boolean")
    return bool(value)


FIELD_ORDER: tuple[str, ...] = tuple(f.name for f in fields(AdapterUnit))

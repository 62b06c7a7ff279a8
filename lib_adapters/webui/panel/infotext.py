"""Units in the image's parameters: ``Adapter N: "Model: depth [1a2b3c4d], Weight: 1, ..."``.

The WebUI quotes the whole value (it holds ``,`` and ``:``) and unquotes it on read; inside it,
fields are ``Label: value`` pairs joined by ", ". Model names are written without ``,``/``:`` so
the pairs stay parseable. A unit writes the fields its family reads (``Family.unit_fields``: a
T2I-Adapter its preprocessor and control mode, an IP-Adapter its blocks and crop); every label is
read back whatever the family, so earlier infotext (IP units once carried the T2I fields too) still
pastes. ``on_infotext_pasted`` splits a unit back into one key per field, ``Adapter N <Label>``,
which the panel's ``infotext_fields`` map onto its components.
"""
from __future__ import annotations

import re
from typing import Any

from typing import Sequence

from ...catalog import split_name_and_hash
from ...inference import t2i
from ...inference.units import LARGEST_FACE, AdapterUnit

PREFIX = "Adapter"
# unit field -> infotext label, for every field a family may write; enabled is implied by the unit's presence.
LABELS: dict[str, str] = {
    "model": "Model", "preprocessor": "Preprocessor", "weight": "Weight", "start": "Start", "end": "End",
    "control_mode": "Control mode", "resize_mode": "Resize mode", "resolution": "Resolution",
    "threshold_a": "Threshold A", "threshold_b": "Threshold B", "block_preset": "Blocks",
    "composition_weight": "Composition weight", "multi_image": "Multi-image", "crop": "Crop",
    "face_index": "Face", "faceid_lora": "LoRA", "faceid_lora_weight": "LoRA weight", "s_scale": "Structure weight",
    "face_pack": "Face models",
}
LARGEST = "largest"  # how "Face" writes LARGEST_FACE
_ON_OFF = {True: "on", False: "off"}
# (unit field, label) of a T2I-Adapter unit, the default
FIELDS: tuple[tuple[str, str], ...] = tuple((name, LABELS[name]) for name in t2i.FAMILY.unit_fields)
_LABEL_TO_FIELD = {label: name for name, label in LABELS.items()}


def unit_key(index: int) -> str:
    return f"{PREFIX} {index + 1}"


def field_key(index: int, label: str) -> str:
    return f"{unit_key(index)} {label}"


def _clean(value: str) -> str:
    return re.sub(r"[,:]", "_", value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(getattr(value, "value", value))


def format_unit(unit: AdapterUnit, model_label: str, fields: Sequence[str] = t2i.FAMILY.unit_fields) -> str:
    """The unit's infotext value: ``fields`` (its family's ``unit_fields``), the model as ``model_label``."""
    values = unit.to_dict()
    values["model"] = model_label
    values["face_index"] = LARGEST if unit.face_index == LARGEST_FACE else unit.face_index
    values["faceid_lora"] = _ON_OFF[unit.faceid_lora]
    return ", ".join(f"{LABELS[name]}: {_clean(_fmt(values[name]))}" for name in fields)


def parse_unit(text: str) -> dict[str, str]:
    """``{"model": ..., "weight": ...}`` from a unit's infotext value; unknown labels are ignored."""
    out: dict[str, str] = {}
    for part in text.split(", "):
        label, sep, value = part.partition(": ")
        name = _LABEL_TO_FIELD.get(label.strip())
        if sep and name:
            out[name] = value.strip()
    return out


def on_infotext_pasted(infotext: str, params: dict[str, Any]) -> None:
    """Expand every ``Adapter N`` entry into per-field keys the panel's components listen to."""
    for key, value in list(params.items()):
        m = re.fullmatch(rf"{PREFIX} (\d+)", str(key))
        if not m or not isinstance(value, str):
            continue
        index = int(m.group(1)) - 1
        params[field_key(index, "Enabled")] = True
        parsed = parse_unit(value)
        if "model" in parsed:  # the dropdown lists bare names; the hash may be ours or sd-webui-controlnet's
            parsed["model"] = split_name_and_hash(parsed["model"])[0]
        values: dict[str, Any] = dict(parsed)
        if parsed.get("face_index") == LARGEST:  # the slider takes the number
            values["face_index"] = str(LARGEST_FACE)
        if "faceid_lora" in parsed:  # the checkbox takes a boolean
            values["faceid_lora"] = parsed["faceid_lora"].lower() in ("on", "true", "1", "yes")
        for name, label in LABELS.items():
            if name in values:
                params[field_key(index, label)] = values[name]

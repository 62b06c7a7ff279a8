"""Units from the UI, the API and infotext: validated once, with messages that name the fix."""
from __future__ import annotations

import pytest

from lib_adapters.errors import InputError
from lib_adapters.inference.units import FIELD_ORDER, AdapterUnit, ControlMode
from lib_adapters.preprocess.resize import ResizeMode
from lib_adapters.webui.panel import infotext


def test_named_fields_with_sd_webui_controlnet_aliases():
    unit = AdapterUnit.from_value({"enabled": "true", "model": "depth", "module": "canny", "weight": "0.5",
                                   "guidance_start": 0.1, "guidance_end": 0.9, "processor_res": 384,
                                   "control_mode": "ControlNet is more important", "resize_mode": 0})
    assert (unit.enabled, unit.preprocessor, unit.weight, unit.start, unit.end, unit.resolution) == (
        True, "canny", 0.5, 0.1, 0.9, 384)
    assert unit.control_mode is ControlMode.ADAPTER and unit.resize_mode is ResizeMode.JUST_RESIZE


def test_positional_list_follows_field_order():
    values = [True, "sketch", "none", 0.8, 0.0, 0.5, "Balanced", "Resize and Fill", 256, -1, -1, None]
    assert FIELD_ORDER[:len(values)] == ("enabled", "model", "preprocessor", "weight", "start", "end", "control_mode",
                                         "resize_mode", "resolution", "threshold_a", "threshold_b", "image")
    unit = AdapterUnit.from_value(values)
    assert (unit.model, unit.weight, unit.end, unit.resize_mode) == ("sketch", 0.8, 0.5, ResizeMode.RESIZE_AND_FILL)
    assert AdapterUnit.from_value(values[:2]).model == "sketch"  # missing trailing values keep defaults


@pytest.mark.parametrize("value,message", [
    ({"weigth": 1}, "unknown adapter unit field 'weigth'"),
    ({"start": 0.8, "end": 0.2}, "0 <= start <= end <= 1"),
    ({"weight": "heavy"}, "invalid adapter unit value"),
    ({"control_mode": "loud"}, "control_mode 'loud' is not one of"),
    ({"enabled": "maybe"}, "not a boolean"),
    ({"resolution": 8}, "resolution 8 is outside"),
    (42, "must be a JSON object or a list"),
    (list(range(30)), "at most"),
    ({"block_preset": "everything"}, "block preset 'everything' is not one of"),
    ({"multi_image": "blend"}, "multi_image 'blend' is not one of"),
    ({"weight": float("nan")}, r"weight nan is outside \[-10, 10\]"),
    ({"composition_weight": float("nan")}, r"composition_weight nan is outside \[-10, 10\]"),
    ({"composition_weight": float("inf")}, r"composition_weight inf is outside \[-10, 10\]"),
    ({"composition_weight": "-inf"}, r"composition_weight -inf is outside \[-10, 10\]"),
    ({"composition_weight": 1e30}, r"composition_weight 1e\+30 is outside \[-10, 10\]"),
    ({"threshold_a": float("nan")}, "threshold_a nan is not a finite number"),
])
def test_bad_values_are_rejected_with_a_reason(value, message):
    with pytest.raises(InputError, match=message):
        AdapterUnit.from_value(value)


def test_active_only_when_enabled_with_a_model_and_nonzero_weight():
    assert AdapterUnit(enabled=True, model="depth").is_active
    assert not AdapterUnit(enabled=False, model="depth").is_active
    assert not AdapterUnit(enabled=True, model="None").is_active
    assert not AdapterUnit(enabled=True, model="depth", weight=0).is_active


def test_infotext_round_trip_through_the_pasted_callback():
    unit = AdapterUnit(enabled=True, model="depth", preprocessor="canny", weight=0.75, start=0.1, end=0.8,
                       control_mode="My prompt is more important", resize_mode="Resize and Fill", resolution=384,
                       threshold_a=50, threshold_b=150)
    text = infotext.format_unit(unit, "t2i_depth, v1: final [1a2b3c4d]")
    assert "," not in text.split("Model: ")[1].split(", Preprocessor")[0]  # the name cannot break the pairs
    params = {"Adapter 2": text, "Steps": "20"}
    infotext.on_infotext_pasted("", params)
    assert params["Adapter 2 Enabled"] is True
    assert params["Adapter 2 Model"] == "t2i_depth_ v1_ final"
    restored = AdapterUnit.from_value({name: params[f"Adapter 2 {label}"] for name, label in infotext.FIELDS})
    assert restored.to_dict() | {"model": "depth", "enabled": True} == unit.to_dict()

"""Bad inputs at generation time, through the Adapters script in the stub WebUI: damaged (NaN/Inf)
model files, out-of-range composition weights and oversized images each cost their unit only, with
a message in the comments and the infotext, and the image equals the one without the unit."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

import driver
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.images import huge_black_png
from modules import shared
from modules.infotext_utils import parse_generation_parameters
from test_panel_e2e import _b64, _condition, _pixels, _units
from test_panel_ip_e2e import _save_style_adapter, webui  # noqa: F401  (webui: the fixture)


def _same_as(result, baseline) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(_pixels(result), _pixels(baseline)))


def _skip_message(result) -> str:
    params = parse_generation_parameters(result.infotexts[0])
    assert "Adapter 1" not in params, "the bad unit was applied"
    message = params["Adapter 1 skipped"]
    assert message in result.comments  # the console/comments and the API's infotext say the same
    return message


def _poison(tensor: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = value
    return tensor


def _damage(models: Path, kind: str) -> dict:
    """A damaged copy of a model file (or the encoder) and the unit that uses it."""
    adapters = models / "adapters"
    if kind == "t2i":
        sd = torch.load(adapters / "depth.pth")
        sd["body.1.block2.weight"] = _poison(sd["body.1.block2.weight"], float("inf"))
        torch.save(sd, adapters / "depth_bad.pth")
        return {"model": "depth_bad", "file": "depth_bad.pth", "tensor": "body.1.block2.weight"}
    if kind == "ip":
        nested = torch.load(adapters / "ip-plus.bin")
        nested["image_proj"]["latents"] = _poison(nested["image_proj"]["latents"])
        torch.save(nested, adapters / "ip-bad.bin")
        return {"model": "ip-bad", "file": "ip-bad.bin", "tensor": "image_proj.latents"}
    if kind == "style":
        _save_style_adapter(models)
        sd = torch.load(adapters / "t2i-style.pth")
        sd["proj"] = _poison(sd["proj"])
        torch.save(sd, adapters / "t2i-style.pth")
        return {"model": "t2i-style", "file": "t2i-style.pth", "tensor": "proj"}
    model = tiny_clip_vision()
    with torch.no_grad():
        model.visual_projection.weight[0, 0] = float("nan")
    save_clip_vision(model, models / "clip_vision")  # replaces the only encoder
    return {"model": "ip-base", "file": "clip_vision_tiny.safetensors", "tensor": "visual_projection.weight"}


@pytest.mark.parametrize("kind", ["t2i", "ip", "style", "encoder"])
def test_a_file_with_nan_or_inf_weights_is_skipped_as_damaged(webui, kind):
    _, models = webui
    baseline = driver.txt2img()
    bad = _damage(models, kind)
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": bad["model"],
                                                     "image": _condition(seed=5), "weight": 1.5}))
    assert _same_as(result, baseline)
    message = _skip_message(result)
    assert f"{bad['file']}: the tensor '{bad['tensor']}' holds" in message and "Download it again" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_composition_weight_out_of_range_skips_the_unit(webui, value):
    baseline = driver.txt2img()
    unit = {"enabled": True, "model": "ip-base", "image": _condition(seed=5), "weight": 2.0,
            "block_preset": "Style and composition", "composition_weight": value}
    result = driver.txt2img(alwayson_scripts=_units(unit))
    assert _same_as(result, baseline)
    message = _skip_message(result)
    assert "composition_weight" in message and "outside [-10, 10]" in message


HUGE = "data:image/png;base64," + base64.b64encode(huge_black_png(12000, 12000)).decode()


@pytest.mark.parametrize("unit", [
    {"model": "depth", "image": HUGE},  # a T2I condition
    {"model": "depth", "image": {"image": HUGE, "mask": None}},  # as gradio's image editor sends it
    {"model": "ip-plus", "image": [_b64(_condition(seed=5)), HUGE]},  # the second reference image
    {"model": "ip-plus", "image": _b64(_condition(seed=5)), "mask": HUGE},  # the attention mask
], ids=["condition", "editor-dict", "reference", "mask"])
def test_an_oversized_image_is_refused_before_decoding(webui, monkeypatch, unit):
    from PIL import ImageFile

    baseline = driver.txt2img(is_api=True)
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self, *a, **k: (decoded.append(self.size), load(self, *a, **k))[1])
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "weight": 2.0, **unit}), is_api=True)
    assert _same_as(result, baseline)
    assert (12000, 12000) not in decoded
    message = _skip_message(result)
    assert "12000x12000" in message and "16 megapixels" in message
    assert "Largest condition, reference or mask image" in message
    if "mask" in unit:
        assert "attention mask" in message


def test_the_limit_is_a_setting_and_applies_to_decoded_arrays(webui):
    shared.opts.data["adapters_max_image_megapixels"] = 1
    big = np.zeros((1100, 1000, 3), np.uint8)
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "depth", "image": big}))
    message = _skip_message(result)
    assert "1000x1100" in message and "above the limit of 1 megapixels" in message
    shared.opts.data["adapters_max_image_megapixels"] = 0  # no limit
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "depth", "image": big}))
    assert "Adapter 1" in result.infotexts[0] and "skipped" not in result.infotexts[0]


def test_more_reference_images_from_the_ui_stay_encoded_until_the_generation(webui, tmp_path):
    from PIL import Image

    from lib_adapters.inference.units import FIELD_ORDER, AdapterUnit
    from lib_adapters.webui.panel.script import _unit_value

    small, huge = tmp_path / "small.png", tmp_path / "huge.png"
    Image.fromarray(_condition(seed=8)).save(small)
    huge.write_bytes(huge_black_png(12000, 12000))
    fields = {"enabled": True, "model": "ip-plus", "weight": 2.0, "image": _condition(seed=5),
              "multi_image": "Concatenate"}
    default = AdapterUnit()
    values = [fields.get(name, getattr(default, name)) for name in FIELD_ORDER]  # the panel's components
    unit = _unit_value(*values, [str(small)])
    assert unit["image"][1] == small.read_bytes()
    api = driver.txt2img(alwayson_scripts=_units(dict(fields, image=[_condition(seed=5), _b64(_condition(seed=8))])))
    ui = driver.txt2img(alwayson_scripts=_units(unit))
    assert _same_as(ui, api) and "Adapter 1" in ui.infotexts[0]
    refused = driver.txt2img(alwayson_scripts=_units(_unit_value(*values, [str(huge)])))
    assert "12000x12000" in _skip_message(refused)

"""IP-Adapter units through the Adapters script in the stub WebUI, alone and with T2I units."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import driver
from fixtures.adapters import diffusers_adapter, save_both_layouts
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import random_ip_state_dict
from lib_adapters.unet.layout import bind_layout
from modules import paths, script_callbacks
from test_panel_e2e import _b64, _condition, _load_script_module, _pixels, _unet_snapshot, _assert_restored, _units


@pytest.fixture()
def webui(tmp_path):
    driver.reset_webui(tmp_path)
    module = _load_script_module()
    import lib_adapters.webui.panel as panel
    panel._resources = None
    model = driver.load_tiny_model("sd1")
    bound = bind_layout(model.model.diffusion_model)
    models = Path(paths.models_path)
    for variant in ("base", "plus"):
        nested = random_ip_state_dict(bound, variant, 32, seed=11)
        (models / "adapters").mkdir(parents=True, exist_ok=True)
        torch.save(nested, models / "adapters" / f"ip-{variant}.bin")
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=4), models / "adapters", "depth")
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript])
    yield model, models


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_ip_unit_changes_the_image_and_restores(webui, variant):
    model, _ = webui
    snap = _unet_snapshot(model)
    base = driver.txt2img(batch_size=2)
    result = driver.txt2img(batch_size=2, alwayson_scripts=_units(
        {"enabled": True, "model": f"ip-{variant}", "image": _condition(seed=5), "weight": 2.0}))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.1
    assert "Blocks: All blocks" in result.infotexts[0] and "Crop: Center crop" in result.infotexts[0]
    _assert_restored(model, snap)


def test_ip_and_t2i_units_combine(webui):
    ip = {"enabled": True, "model": "ip-plus", "image": _condition(seed=5), "weight": 2.0}
    t2i = {"enabled": True, "model": "depth", "image": _condition(seed=6)}
    only_ip = driver.txt2img(alwayson_scripts=_units(ip))
    only_t2i = driver.txt2img(alwayson_scripts=_units(t2i))
    both = driver.txt2img(alwayson_scripts=_units(ip, t2i))
    for single in (only_ip, only_t2i):
        assert np.abs(_pixels(both)[0] - _pixels(single)[0]).mean() > 0.1
    assert "Adapter 1" in both.infotexts[0] and "Adapter 2" in both.infotexts[0]


def test_several_reference_images_over_the_api(webui):
    one = {"enabled": True, "model": "ip-base", "image": _b64(_condition(seed=5)), "weight": 2.0}
    three = dict(one, image=[_b64(_condition(seed=s)) for s in (5, 6, 7)], multi_image="Concatenate")
    a = driver.txt2img(alwayson_scripts=_units(one), is_api=True)
    b = driver.txt2img(alwayson_scripts=_units(three), is_api=True)
    assert np.abs(_pixels(a)[0] - _pixels(b)[0]).mean() > 0.1
    assert "Multi-image: Concatenate" in b.infotexts[0]


def test_img2img_ip_unit_uses_the_input_image(webui):
    from PIL import Image

    init = Image.fromarray(_condition(seed=8))
    base = driver.img2img([init])
    result = driver.img2img([init], alwayson_scripts=_units({"enabled": True, "model": "ip-plus", "weight": 2.0}))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.05
    assert "Adapter 1" in result.infotexts[0]


def test_missing_encoder_skips_the_unit_and_says_where_it_goes(webui):
    _, models = webui
    for f in (models / "clip_vision").iterdir():
        f.unlink()
    ip = {"enabled": True, "model": "ip-plus", "image": _condition(seed=5)}
    t2i = {"enabled": True, "model": "depth", "image": _condition(seed=6)}
    only_t2i = driver.txt2img(alwayson_scripts=_units(t2i))
    result = driver.txt2img(alwayson_scripts=_units(ip, t2i))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(only_t2i), _pixels(result)))
    assert "Adapter 1 skipped" in result.comments and "clip_vision" in result.comments


def test_style_preset_from_the_api(webui):
    unit = {"enabled": True, "model": "ip-base", "image": _condition(seed=5), "weight": 2.0}
    full = driver.txt2img(alwayson_scripts=_units(unit))
    style = driver.txt2img(alwayson_scripts=_units(dict(unit, block_preset="Style")))
    assert np.abs(_pixels(full)[0] - _pixels(style)[0]).mean() > 0.1
    assert "Blocks: Style" in style.infotexts[0]


def test_attention_mask_over_the_api(webui):
    unit = {"enabled": True, "model": "ip-plus", "image": _b64(_condition(seed=5)), "weight": 2.0}
    base = driver.txt2img(is_api=True)
    black = driver.txt2img(alwayson_scripts=_units(dict(unit, mask=_b64(np.zeros((64, 64, 3), np.uint8)))),
                           is_api=True)
    white = driver.txt2img(alwayson_scripts=_units(dict(unit, mask=_b64(np.full((64, 64, 3), 255, np.uint8)))),
                           is_api=True)
    unmasked = driver.txt2img(alwayson_scripts=_units(unit), is_api=True)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base), _pixels(black)))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(unmasked), _pixels(white)))


def _save_style_adapter(models):
    from lib_adapters.models.t2i_adapter import StyleAdapter, StyleAdapterConfig

    torch.manual_seed(2)
    style = StyleAdapter(StyleAdapterConfig(width=96, context_dim=32, num_heads=8, num_layers=1, num_tokens=8))
    torch.save(style.state_dict(), models / "adapters" / "t2i-style.pth")


def test_style_t2i_adapter_unit(webui):
    _, models = webui
    _save_style_adapter(models)
    base = driver.txt2img()
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "t2i-style", "image": _condition(seed=9),
                                                      "weight": 1.0}))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.1
    assert "Adapter 1" in result.infotexts[0]


def test_style_adapter_without_its_encoder_is_skipped(webui):
    _, models = webui
    _save_style_adapter(models)
    for f in (models / "clip_vision").iterdir():
        f.unlink()
    result = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "t2i-style", "image": _condition()}))
    assert "Adapter 1 skipped" in result.comments and "ViT-L/14" in result.comments


def test_each_family_writes_only_its_own_fields_and_is_checked_once(webui, monkeypatch):
    """Infotext: an IP unit has no preprocessor, resolution, thresholds or control/resize mode (they do nothing
    for it); a T2I unit no IP options; a style unit its crop. Each file is checked against the UNet once."""
    from lib_adapters.formats.ip import LoadedIPAdapter
    from lib_adapters.formats.t2i import LoadedT2IAdapter
    from modules.infotext_utils import parse_generation_parameters

    _, models = webui
    _save_style_adapter(models)
    checks = []
    for cls in (LoadedIPAdapter, LoadedT2IAdapter):
        original = cls.check_compatible
        monkeypatch.setattr(cls, "check_compatible", lambda self, bound, label, original=original: (
            checks.append(label), original(self, bound, label))[1])
    units = [{"enabled": True, "model": "ip-plus", "image": _condition(seed=5), "weight": 2.0},
             {"enabled": True, "model": "depth", "image": _condition(seed=6)},
             {"enabled": True, "model": "t2i-style", "image": _condition(seed=9)}]
    params = parse_generation_parameters(driver.txt2img(alwayson_scripts=_units(*units)).infotexts[0])
    assert sorted(checks) == ["Adapter 1", "Adapter 2", "Adapter 3"]
    labels = [[part.split(": ")[0] for part in params[f"Adapter {i}"].split(", ")] for i in (1, 2, 3)]
    assert labels[0] == ["Model", "Weight", "Start", "End", "Blocks", "Composition weight", "Multi-image", "Crop"]
    assert labels[1] == ["Model", "Preprocessor", "Weight", "Start", "End", "Control mode", "Resize mode",
                         "Resolution", "Threshold A", "Threshold B"]
    assert labels[2] == ["Model", "Weight", "Start", "End", "Crop"]


def test_an_ip_unit_written_with_the_t2i_fields_still_pastes(webui):
    """Infotext from before the families wrote their own fields: every label is still read back."""
    from modules.infotext_utils import parse_generation_parameters

    old = ('a prompt\nSteps: 4, Sampler: Euler, CFG scale: 7, Adapter 1: "Model: ip-plus [00000000], '
           'Preprocessor: none, Weight: 0.7, Start: 0, End: 0.9, Control mode: Balanced, Resize mode: Crop and Resize, '
           'Resolution: 512, Threshold A: -1, Threshold B: -1, '
           'Blocks: Style, Composition weight: 1, Multi-image: Average, Crop: Squash"')
    params = parse_generation_parameters(old)
    script_callbacks.infotext_pasted_callback(old, params)
    assert (params["Adapter 1 Model"], params["Adapter 1 Weight"], params["Adapter 1 End"]) == ("ip-plus", "0.7", "0.9")
    assert (params["Adapter 1 Blocks"], params["Adapter 1 Crop"], params["Adapter 1 Resolution"]) == (
        "Style", "Squash", "512")

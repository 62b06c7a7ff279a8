"""Caches across generations through the Adapters script in the stub WebUI: a T2I unit, an IP unit and
its CLIP encoder are read and encoded once, then reused; models in use survive any budget; a new
image is encoded; another checkpoint or device empties the caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import driver
from lib_adapters.formats import reader
from modules import devices, script_callbacks, shared
from test_panel_e2e import _condition, _pixels, _units
from test_panel_ip_e2e import webui  # noqa: F401  (the fixture: tiny SD1 model, depth + IP files, tiny encoder)


@pytest.fixture()
def counts(monkeypatch):
    """Files read from disk (any weight file, by name) and CLIP vision forward passes."""
    from transformers import CLIPVisionModelWithProjection

    seen = {"reads": [], "encoder_forwards": 0}
    for name in ("_read_safetensors", "_read_pickle"):
        original = getattr(reader, name)

        def counting(path, original=original):
            seen["reads"].append(path.name)
            return original(path)

        monkeypatch.setattr(reader, name, counting)
    forward = CLIPVisionModelWithProjection.forward

    def counting_forward(self, *args, **kwargs):
        seen["encoder_forwards"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CLIPVisionModelWithProjection, "forward", counting_forward)

    def take():
        out = (sorted(seen["reads"]), seen["encoder_forwards"])
        seen["reads"], seen["encoder_forwards"] = [], 0
        return out

    return take


IP = {"enabled": True, "model": "ip-plus", "image": _condition(seed=5), "weight": 2.0}
T2I = {"enabled": True, "model": "depth", "image": _condition(seed=6)}
FILES = ["clip_vision_tiny.safetensors", "depth.pth", "ip-plus.bin"]


def _resources():
    import lib_adapters.webui.panel as panel
    return panel.resources()


def test_second_generation_reads_no_file_and_runs_no_encoder(webui, counts):
    first = driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == (FILES, 2)  # the reference image and "no image"
    second = driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == ([], 0)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(second)))
    assert "Adapter 1" in second.infotexts[0] and "Adapter 2" in second.infotexts[0]


def test_a_changed_image_or_crop_is_encoded_the_rest_reused(webui, counts):
    driver.txt2img(alwayson_scripts=_units(IP))
    counts()
    wide = np.concatenate([_condition(seed=7), _condition(seed=9)], axis=1)  # 64x128: the crop mode matters
    other = driver.txt2img(alwayson_scripts=_units(dict(IP, image=wide)))
    assert counts() == ([], 1)  # the new image only: "no image" and the adapter and encoder files are cached
    squash = driver.txt2img(alwayson_scripts=_units(dict(IP, image=wide, crop="Squash")))
    assert counts() == ([], 1)
    again = driver.txt2img(alwayson_scripts=_units(dict(IP, image=wide.copy())))
    assert counts() == ([], 0)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(other), _pixels(again)))
    assert not np.array_equal(_pixels(other)[0], _pixels(squash)[0])


def test_switching_multi_image_mode_reuses_the_encoding_with_the_same_result(webui, counts):
    two = dict(IP, image=[_condition(seed=5), _condition(seed=8)])
    driver.txt2img(alwayson_scripts=_units(two))
    assert counts()[1] == 2
    concat = driver.txt2img(alwayson_scripts=_units(dict(two, multi_image="Concatenate")))
    assert counts() == ([], 0)  # the multi-image mode acts on the encoder outputs, which are cached
    _resources().clear()
    fresh = driver.txt2img(alwayson_scripts=_units(dict(two, multi_image="Concatenate")))
    assert counts() == (["clip_vision_tiny.safetensors", "ip-plus.bin"], 2)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(concat), _pixels(fresh)))


def test_models_in_use_are_kept_mid_generation_whatever_the_budget(webui, counts):
    shared.opts.data["adapters_cache_budget_mb"] = 0  # keep nothing between generations
    held_during_sampling = []
    script_callbacks.on_cfg_denoiser(lambda params: held_during_sampling.append(
        sorted(p.rsplit("/", 1)[-1] for p in _resources().adapters.cached_paths())))
    driver.txt2img(alwayson_scripts=_units(IP, T2I), steps=2)
    assert counts() == (FILES, 2)
    assert held_during_sampling == [FILES, FILES]
    assert _resources().adapters.cached_paths() == []  # trimmed to the budget once the generation ended
    driver.txt2img(alwayson_scripts=_units(IP, T2I), steps=2)
    assert counts()[0] == ["depth.pth", "ip-plus.bin"]  # the encoder's outputs were cached: not read again


def test_another_checkpoint_empties_the_caches(webui, counts):
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    counts()
    driver.load_tiny_model("sd1", seed=1)  # fires on_model_loaded, as the WebUI's reload does
    assert _resources().adapters.cached_paths() == [] and len(_resources().encodings) == 0
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == (FILES, 2)


def test_another_checkpoint_or_device_empties_the_caches_without_the_callback(webui, counts, monkeypatch):
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    counts()
    driver.load_tiny_model("sd1", seed=1, fire_callbacks=False)
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == (FILES, 2)
    monkeypatch.setattr(devices, "device", torch.device("cpu", 0))  # what the WebUI would run on next
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == (FILES, 2)
    driver.txt2img(alwayson_scripts=_units(IP, T2I))
    assert counts() == ([], 0)


def test_the_budget_setting_replaces_the_old_count(webui):
    from lib_adapters.inference.cache import DEFAULT_BUDGET_MB, MB
    from lib_adapters.webui.panel import settings

    shared.opts.data["adapters_cache_size"] = 1  # an old config.json: read without effect
    assert settings.current().cache_budget_mb == DEFAULT_BUDGET_MB
    assert "adapters_cache_budget_mb" in shared.opts.data_labels and "adapters_cache_size" not in shared.opts.data_labels
    shared.opts.data["adapters_cache_budget_mb"] = 512
    assert _resources().adapters.budget_bytes == 512 * MB
    shared.opts.data["adapters_cache_budget_mb"] = "garbage"
    assert settings.current().cache_budget_mb == DEFAULT_BUDGET_MB


def test_a_repeated_ip_unit_is_not_projected_again(webui, monkeypatch):
    """The image tokens are kept too (by adapter file, encoding and multi-image mode): no Resampler pass."""
    from lib_adapters.models.resampler import Resampler

    calls = []
    forward = Resampler.forward
    monkeypatch.setattr(Resampler, "forward", lambda self, x: (calls.append(x.shape[0]), forward(self, x))[1])
    two = dict(IP, image=[_condition(seed=5), _condition(seed=8)])
    first = driver.txt2img(alwayson_scripts=_units(two))
    assert calls == [2, 1]  # the two images, then "no image"
    again = driver.txt2img(alwayson_scripts=_units(two))
    assert calls == [2, 1] and all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again)))
    driver.txt2img(alwayson_scripts=_units(dict(two, multi_image="Concatenate")))
    assert calls == [2, 1, 2, 1]  # other tokens from the same (cached) encoding
    driver.txt2img(alwayson_scripts=_units(dict(two, multi_image="Concatenate")))
    assert calls == [2, 1, 2, 1]

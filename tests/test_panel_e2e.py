"""The Adapters script end to end in the stub WebUI: txt2img, img2img, hires fix, batches, the API,
infotext, bad units, and exact restore of the UNet after every generation."""
from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import driver
from fixtures.adapters import diffusers_adapter, save_both_layouts
from fixtures.unets import install_webui_cat_hijack
from modules import paths, script_callbacks, shared
from modules.infotext_utils import parse_generation_parameters

ROOT = Path(__file__).resolve().parents[1]
TITLE = "Adapters"


def _load_script_module():
    """As the WebUI loads scripts/adapters.py: by file location, with the extension root on sys.path."""
    spec = importlib.util.spec_from_file_location("adapters.py", ROOT / "scripts" / "adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def webui(tmp_path):
    install_webui_cat_hijack()
    driver.reset_webui(tmp_path)
    module = _load_script_module()
    module.release_resources()
    import lib_adapters.webui.panel as panel
    panel._resources = None  # a fresh models folder per test
    models = Path(paths.models_path) / "adapters"
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=4), models, "depth")
    save_both_layouts(diffusers_adapter("full_adapter", 1, seed=5), models, "canny")
    save_both_layouts(diffusers_adapter("full_adapter_xl", 3, seed=6), models, "xl_sketch")
    model = driver.load_tiny_model("sd1")
    driver.build_runners([module.AdaptersScript])
    yield model, models


def _condition(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pixels(processed):
    return [np.asarray(im).astype(np.int16) for im in processed.images]


def _unet_snapshot(model):
    unet = model.model.diffusion_model
    return ({n: m.__dict__.get("forward") for n, m in unet.named_modules()},
            {k: v.clone() for k, v in unet.state_dict().items()})


def _assert_restored(model, snapshot):
    forwards, state = snapshot
    unet = model.model.diffusion_model
    assert {n: m.__dict__.get("forward") for n, m in unet.named_modules()} == forwards
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def _units(*units):
    return {TITLE: list(units)}


def test_two_units_hires_fix_and_batch_of_two(webui):
    model, _ = webui
    snap = _unet_snapshot(model)
    kwargs = dict(batch_size=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=2)
    base = driver.txt2img(**kwargs)
    depth = {"enabled": True, "model": "depth", "image": _condition(), "weight": 1.0}
    canny = {"enabled": True, "model": "canny", "preprocessor": "canny", "image": _condition(seed=1), "weight": 0.7,
             "threshold_a": 50, "threshold_b": 150}
    result = driver.txt2img(alwayson_scripts=_units(depth, canny), **kwargs)
    assert len(result.images) == 2 and result.images[0].size == (96, 96)  # hires 64 * 1.5
    for a, b in zip(_pixels(base), _pixels(result)):
        assert np.abs(a - b).mean() > 1.0
    params = parse_generation_parameters(result.infotexts[0])
    assert params["Adapter 1"].startswith("Model: depth [") and "Preprocessor: canny" in params["Adapter 2"]
    _assert_restored(model, snap)


def test_features_once_per_resolution_hires_recomputes(webui, monkeypatch):
    from lib_adapters.models.t2i_adapter import FullAdapter

    sizes = []
    original = FullAdapter.forward
    monkeypatch.setattr(FullAdapter, "forward", lambda self, x: (sizes.append(tuple(x.shape[-2:])), original(self, x))[1])
    unit = {"enabled": True, "model": "depth", "image": _condition()}
    driver.txt2img(alwayson_scripts=_units(unit), steps=6, batch_size=2, enable_hr=True, hr_scale=2.0,
                   denoising_strength=0.6, hr_second_pass_steps=3)
    assert sizes == [(64, 64), (128, 128)]


def test_disabled_unit_and_weight_zero_are_bit_identical_to_no_extension(webui):
    model, _ = webui
    no_extension = driver.run_processing(driver.make_txt2img(), runner=driver.build_runner([], is_img2img=False))
    off = driver.txt2img(alwayson_scripts=_units({"enabled": False, "model": "depth", "image": _condition()}))
    zero = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "depth", "image": _condition(),
                                                   "weight": 0.0}))
    for other in (off, zero):
        assert all(np.array_equal(a, b) for a, b in zip(_pixels(no_extension), _pixels(other)))
    assert "Adapter 1" not in zero.infotexts[0]


def test_img2img_uses_the_input_image_when_the_unit_has_none(webui):
    model, _ = webui
    init = Image.fromarray(_condition(seed=3))
    base = driver.img2img([init])
    result = driver.img2img([init], alwayson_scripts=_units({"enabled": True, "model": "depth"}))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 1.0
    assert "Adapter 1" in result.infotexts[0]


def test_inpainting_with_a_unit(webui):
    init = Image.fromarray(_condition(seed=3))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = driver.img2img([init], mask=mask, alwayson_scripts=_units({"enabled": True, "model": "canny",
                                                                        "preprocessor": "canny"}))
    assert len(result.images) == 1 and "Adapter 1" in result.infotexts[0]


@pytest.mark.parametrize("bad,reason", [
    ({"enabled": True, "model": "missing_model", "image": None}, "not found"),
    ({"enabled": True, "model": "xl_sketch"}, "SDXL T2I-Adapter"),
    ({"enabled": True, "model": "depth", "weigth": 2}, "unknown adapter unit field"),
    ({"enabled": True, "model": "truncated"}, "download it again"),
])
def test_a_bad_unit_is_skipped_with_a_message_and_the_others_still_apply(webui, bad, reason):
    model, models = webui
    data = (models / "depth.pth").read_bytes()
    (models / "truncated.pth").write_bytes(data[: len(data) // 3])
    good = {"enabled": True, "model": "depth", "image": _condition()}
    bad = {"image": _condition(), **bad}
    only_good = driver.txt2img(alwayson_scripts=_units(good))
    result = driver.txt2img(alwayson_scripts=_units(bad, good))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(only_good), _pixels(result)))
    params = parse_generation_parameters(result.infotexts[0])
    assert "Adapter 2" in params and "Adapter 1" not in params
    assert reason in params["Adapter 1 skipped"]
    assert reason in result.comments and "Adapter 1 skipped" in result.comments


def test_sampling_error_still_restores_the_unet(webui, monkeypatch):
    model, _ = webui
    snap = _unet_snapshot(model)
    out = model.model.diffusion_model.out

    def explode(module, args):
        raise RuntimeError("sampler exploded")

    handle = out.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="sampler exploded"):
            driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "depth", "image": _condition()}))
    finally:
        handle.remove()
    _assert_restored(model, snap)


def test_model_reload_and_script_unload_restore(webui):
    model, _ = webui
    snap = _unet_snapshot(model)
    runner = driver.scripts.scripts_txt2img
    script = runner.script(TITLE)
    p = driver.make_txt2img()
    p.scripts, p.script_args = runner, tuple(driver.default_script_args(
        runner, _units({"enabled": True, "model": "depth", "image": _condition()})))
    script.process(p, *p.script_args[script.args_from:script.args_to])
    assert model.model.diffusion_model.input_blocks[2].__dict__.get("forward") is not None
    script_callbacks.model_loaded_callback(model)
    _assert_restored(model, snap)
    script.process(p, *p.script_args[script.args_from:script.args_to])
    script_callbacks.script_unloaded_callback()
    _assert_restored(model, snap)


def test_api_named_fields_base64_and_positional_lists(webui):
    named = {"enabled": True, "model": "depth", "image": _b64(_condition()), "weight": 0.9,
             "guidance_end": 0.8, "resize_mode": "Just Resize"}
    positional = [True, "depth", "none", 0.9, 0.0, 0.8, "Balanced", "Just Resize", 512, -1, -1, _b64(_condition())]
    a = driver.txt2img(alwayson_scripts=_units(named), is_api=True)
    b = driver.txt2img(alwayson_scripts=_units(positional), is_api=True)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    assert "Weight: 0.9" in a.infotexts[0] and "End: 0.8" in a.infotexts[0]


def test_infotext_restores_the_unit_fields(webui):
    unit = {"enabled": True, "model": "canny", "preprocessor": "canny", "image": _condition(), "weight": 0.6,
            "start": 0.1, "end": 0.9, "control_mode": "My prompt is more important", "threshold_a": 60,
            "threshold_b": 160}
    result = driver.txt2img(alwayson_scripts=_units(unit))
    params = parse_generation_parameters(result.infotexts[0])
    script_callbacks.infotext_pasted_callback(result.infotexts[0], params)
    script = driver.scripts.scripts_txt2img.script(TITLE)
    by_label = {label: component for component, label in script.infotext_fields}
    assert {"Adapter 1 Enabled", "Adapter 1 Model", "Adapter 1 Weight"} <= set(by_label)
    assert params["Adapter 1 Enabled"] is True and params["Adapter 1 Model"] == "canny"
    assert (params["Adapter 1 Weight"], params["Adapter 1 Start"], params["Adapter 1 End"]) == ("0.6", "0.1", "0.9")
    assert params["Adapter 1 Control mode"] == "My prompt is more important"
    assert (params["Adapter 1 Threshold A"], params["Adapter 1 Threshold B"]) == ("60", "160")


def test_denoiser_rows_reach_the_session(webui, monkeypatch):
    from lib_adapters.inference.session import GenerationSession

    seen = []
    original = GenerationSession.on_denoiser
    monkeypatch.setattr(GenerationSession, "on_denoiser",
                        lambda self, c, u, s, t: (seen.append((c, u, s, t)), original(self, c, u, s, t))[1])
    unit = {"enabled": True, "model": "depth", "image": _condition(), "control_mode": "Adapter is more important"}
    shared.opts.data["batch_cond_uncond"] = False
    driver.txt2img(alwayson_scripts=_units(unit), batch_size=2, steps=3, prompt="a cat AND a hat")
    assert [(c, u) for c, u, _, _ in seen] == [(4, 2)] * 3  # two AND sub-prompts per image, then uncond rows
    assert [s for _, _, s, _ in seen] == [0, 1, 2]


def test_preview_shows_the_preprocessed_condition(webui):
    import gradio as gr

    script = driver.scripts.scripts_txt2img.script(TITLE)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    edges = script._preview({"enabled": True, "model": "depth", "preprocessor": "canny", "image": image,
                             "resolution": 64})
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[32, 32].max() == 0 and edges[14:19, 32].max() == 255  # flat inside, an edge at the border
    with pytest.raises(gr.Error, match="upload a condition image first"):
        script._preview({"enabled": True, "preprocessor": "canny"})


def test_missing_preprocessor_weights_name_the_file_and_folder(webui):
    good = {"enabled": True, "model": "depth", "image": _condition()}
    bad = {"enabled": True, "model": "depth", "preprocessor": "depth_midas", "image": _condition()}
    result = driver.txt2img(alwayson_scripts=_units(bad, good))
    assert "Adapter 1 skipped" in result.comments
    assert "dpt_hybrid-midas-501f0c75.pt" in result.comments and "annotators" in result.comments


def test_batch_count_reuses_one_session_per_batch_and_restores(webui):
    model, _ = webui
    snap = _unet_snapshot(model)
    unit = {"enabled": True, "model": "depth", "image": _condition()}
    base = driver.txt2img(n_iter=2, batch_size=2)
    result = driver.txt2img(n_iter=2, batch_size=2, alwayson_scripts=_units(unit))
    assert len(result.images) == len(base.images) == 4  # two batches of two (the driver saves no grid)
    assert all(np.abs(a - b).mean() > 1.0 for a, b in zip(_pixels(base), _pixels(result)))
    assert len({im.tobytes() for im in result.images}) == 4
    _assert_restored(model, snap)


def test_interrupt_returns_a_partial_result_and_restores(webui):
    model, _ = webui
    snap = _unet_snapshot(model)
    calls = []

    def interrupt_after_two_steps(params):
        calls.append(params.sampling_step)
        if len(calls) == 2:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(interrupt_after_two_steps)
    result = driver.txt2img(steps=8, alwayson_scripts=_units({"enabled": True, "model": "depth", "image": _condition()}))
    assert len(calls) == 2 and len(result.images) == 1  # stopped early, still an image
    _assert_restored(model, snap)
    shared.state.interrupted = False
    again = driver.txt2img(alwayson_scripts=_units({"enabled": True, "model": "depth", "image": _condition()}))
    assert "Adapter 1" in again.infotexts[0]


def test_settings_exist_without_the_ui(webui):
    assert shared.opts.adapters_unit_count == 3
    assert "adapters_unit_count" in shared.opts.data_labels  # what GET /sdapi/v1/options lists


def test_pasted_thresholds_survive_the_preprocessor_change(webui):
    from lib_adapters.webui.panel.script import _threshold_updates

    a, b = _threshold_updates("canny", 50, 150)
    assert (a["value"], b["value"]) == (50, 150)
    a, b = _threshold_updates("canny", -1, 999)  # no value / out of range: the preprocessor's defaults
    assert (a["value"], b["value"]) == (100, 200)


def test_files_removed_after_use_cost_only_their_unit(webui):
    _, models = webui
    depth = {"enabled": True, "model": "depth", "image": _condition()}
    canny = {"enabled": True, "model": "canny", "image": _condition(seed=2)}
    driver.txt2img(alwayson_scripts=_units(canny, depth))  # both found and cached
    (models / "canny.pth").rename(models.parent / "canny.pth.away")
    only_depth = driver.txt2img(alwayson_scripts=_units(depth))
    result = driver.txt2img(alwayson_scripts=_units(canny, depth))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(only_depth), _pixels(result)))
    assert "Adapter 1 skipped" in result.comments
    assert "Adapter 1 skipped" in result.infotexts[0]  # API clients read the infotext


def test_pickles_load_under_the_webui_safe_unpickler(webui, monkeypatch):
    """Inside the WebUI torch.load is modules.safe.load, which rejects current torch zip files and
    returns None; the reader must use the original loader (weights_only keeps it safe)."""
    from lib_adapters.formats.reader import read_state_dict
    from modules import safe

    _, models = webui
    real = torch.load
    monkeypatch.setattr(safe, "unsafe_torch_load", real, raising=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # what safe.load returns for these files
    assert "conv_in.weight" in read_state_dict(models / "depth.pth")


def test_infotext_names_models_with_sd_webui_controlnets_hash(webui):
    """sd-webui-controlnet writes `Model: name [sd_models.model_hash(file)]`; ours is the same, both ways."""
    from modules import sd_models

    _, models = webui
    controlnet_hash = sd_models.model_hash(str(models / "depth.pth"))
    unit = {"enabled": True, "model": "depth", "image": _condition()}
    result = driver.txt2img(alwayson_scripts=_units(unit))
    assert f"Model: depth [{controlnet_hash}]" in result.infotexts[0]
    again = driver.txt2img(alwayson_scripts=_units(dict(unit, model=f"depth [{controlnet_hash}]")))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(result), _pixels(again)))

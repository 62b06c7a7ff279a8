"""Tests of the fake WebUI in ``tests/stubs``: hook order, CFG row layout, interrupts, determinism,
infotext, and the small helper modules. They pin the behaviour of WebUI v1.10.1 that the stubs mirror."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

_STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs")
if _STUBS not in sys.path:  # tests/conftest.py normally does this already
    sys.path.insert(0, _STUBS)

import driver  # noqa: E402
import gradio as gr  # noqa: E402
from modules import errors, infotext_utils, paths, script_callbacks, scripts, shared  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402
from tiny_model import build_tiny_sd_model  # noqa: E402

HOOKS = ("setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
         "process_before_every_sampling", "before_hr", "post_sample", "postprocess_batch", "postprocess_batch_list",
         "postprocess_image", "postprocess_maskoverlay", "postprocess_image_after_composite", "on_mask_blend", "postprocess")


class Recorder(scripts.Script):
    """Records every hook with its script args and a few facts about ``p``."""

    calls: list = []

    def title(self):
        return "Recorder"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Recorder") as enabled:
            weight = gr.Slider(minimum=0, maximum=1, value=0.5, label="Weight")
        return [enabled, weight]


def _recording_hook(name):
    def hook(self, p, *args, **kwargs):
        args = args[1:] if name in ("post_sample", "postprocess_batch_list", "postprocess_image", "postprocess_maskoverlay",
                                    "postprocess_image_after_composite", "on_mask_blend", "postprocess") else args
        x = kwargs.get("x")
        Recorder.calls.append((name, tuple(args), p.is_hr_pass, None if x is None else tuple(x.shape)))
    return hook


for _name in HOOKS:
    setattr(Recorder, _name, _recording_hook(_name))


class Second(scripts.Script):
    def title(self):
        return "Second"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(value="default text")]

    def process(self, p, text):
        p.extra_generation_params["Second text"] = text
        p.extra_generation_params["Second list"] = [f"img{i}" for i in range(len(p.all_prompts))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box OpenMP barriers make
    them 10-30x slower; restored afterwards so other test modules keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1_model():
    return build_tiny_sd_model("sd1", seed=0)


@pytest.fixture()
def webui(tmp_path, sd1_model):
    driver.reset_webui(tmp_path)
    driver.load_tiny_model(model=sd1_model)
    driver.build_runners([Recorder, Second])
    Recorder.calls = []
    yield sd1_model
    driver.reset_webui()


def _names():
    return [c[0] for c in Recorder.calls]


def _unet_batches(model):
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[0], kwargs["context"].shape[1])), with_kwargs=True)
    return seen, handle


def test_hook_order_txt2img_with_hires_fix(webui):
    res = driver.txt2img(alwayson_scripts={"Recorder": [True, 0.25]}, enable_hr=True, hr_scale=2.0, denoising_strength=0.5)
    assert _names() == ["setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate",
                        "process_batch", "process_before_every_sampling", "after_extra_networks_activate", "before_hr",
                        "process_before_every_sampling", "post_sample", "postprocess_batch", "postprocess_batch_list",
                        "postprocess_image", "postprocess_maskoverlay", "postprocess_image_after_composite", "postprocess"]
    assert all(c[1] == (True, 0.25) for c in Recorder.calls)
    first, second = [c for c in Recorder.calls if c[0] == "process_before_every_sampling"]
    assert (first[2], first[3]) == (False, (1, 4, 8, 8))
    assert (second[2], second[3]) == (True, (1, 4, 16, 16))
    assert res.images[0].size == (128, 128)
    assert "Hires upscale: 2.0" in res.infotexts[0] and "Denoising strength: 0.5" in res.infotexts[0]


def test_hook_order_img2img_inpaint_and_fewer_denoiser_steps(webui):
    seen, handle = _unet_batches(webui)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    try:
        res = driver.img2img([init], steps=4, denoising_strength=0.5, mask=mask, mask_blur=0)
    finally:
        handle.remove()
    names = _names()
    assert names == ["setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate",
                     "process_batch", "process_before_every_sampling"] + ["on_mask_blend"] * 4 + [
                     "post_sample", "postprocess_batch", "postprocess_batch_list", "postprocess_image",
                     "postprocess_maskoverlay", "postprocess_image_after_composite", "postprocess"]
    assert len(seen) == 3  # t_enc = int(0.5 * 4) = 2 -> sigmas[4 - 2 - 1:] -> 3 denoiser calls < p.steps
    out = np.asarray(res.images[0]).astype(int)
    assert np.abs(out[0, 0] - (200, 30, 30)).max() <= 2  # outside the mask the original is composited back
    assert "Denoising strength: 0.5" in res.infotexts[0]


def test_exception_in_sampling_skips_postprocess(webui):
    def boom(module, args):
        raise RuntimeError("unet failed")

    handle = webui.model.diffusion_model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="unet failed"):
            driver.txt2img()
    finally:
        handle.remove()
    assert _names()[-1] == "process_before_every_sampling"
    assert "postprocess" not in _names()


def test_failing_hook_is_reported_and_generation_goes_on(webui, capsys):
    def bad_process(self, p, *args):
        raise ValueError("script bug")

    Second.process, original = bad_process, Second.process
    try:
        res = driver.txt2img()
    finally:
        Second.process = original
    assert len(res.images) == 1 and "postprocess" in _names()
    assert "Error running process" in capsys.readouterr().err
    assert errors.exception_records[-1]["exception"] == "script bug"


def test_denoiser_rows_cond_first_then_uncond(webui):
    records = []

    def on_denoiser(params):
        records.append((params.x.clone(), params.text_cond.shape, params.text_uncond.shape, params.denoiser.step,
                        params.denoiser.total_steps))

    script_callbacks.on_cfg_denoiser(on_denoiser)
    seen, handle = _unet_batches(webui)
    try:
        driver.txt2img(prompt="red AND blue", negative_prompt="ugly", batch_size=2, steps=3)
    finally:
        handle.remove()
    x, cond_shape, uncond_shape, step, total = records[0]
    assert x.shape[0] == 6 and cond_shape[0] == 4 and uncond_shape[0] == 2  # 2 images x 2 sub-prompts, then 2 uncond
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3])  # image 0's sub-prompt rows, then image 1's
    assert torch.equal(x[4], x[0]) and torch.equal(x[5], x[2])  # one uncond row per image, same latent
    assert [r[3] for r in records] == [0, 1, 2] and total == 3
    assert seen == [(6, 77)] * 3


def test_batch_cond_uncond_false_and_different_lengths_split_calls(webui):
    seen, handle = _unet_batches(webui)
    try:
        shared.opts.batch_cond_uncond = False
        driver.txt2img(batch_size=2, steps=2)
        assert seen == [(2, 77), (2, 77)] * 2
        seen.clear()
        shared.opts.batch_cond_uncond = True
        driver.txt2img(batch_size=2, steps=2)
        assert seen == [(4, 77)] * 2
        seen.clear()
        driver.txt2img(prompt=" ".join(["word"] * 80), batch_size=2, steps=1)
        assert seen == [(2, 154), (2, 77)]  # cond chunk, then a separate uncond call
    finally:
        handle.remove()


def test_skip_early_cond_drops_uncond_rows(webui):
    seen, handle = _unet_batches(webui)
    shared.opts.skip_early_cond = 0.5
    try:
        res = driver.txt2img(steps=4)
    finally:
        handle.remove()
    assert [s[0] for s in seen] == [1, 1, 1, 2]
    assert "Skip Early CFG: 0.5" in res.infotexts[0]


def test_interrupt_returns_partial_result_and_postprocess_runs(webui):
    seen, handle = _unet_batches(webui)
    steps_seen = []

    def interrupt_at_second_step(params):
        steps_seen.append((params.sampling_step, params.total_sampling_steps))
        if params.denoiser.step == 1:
            shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(interrupt_at_second_step)
    try:
        res = driver.txt2img(steps=6)
    finally:
        handle.remove()
    assert len(seen) == 2 and len(res.images) == 1
    assert _names()[-1] == "postprocess"
    assert steps_seen == [(0, 6), (0, 6)]  # sampling_step is set after a step completes


def test_images_deterministic_and_seed_and_prompt_sensitive(webui):
    a = driver.txt2img(seed=7).images[0].tobytes()
    b = driver.txt2img(seed=7).images[0].tobytes()
    c = driver.txt2img(seed=8).images[0].tobytes()
    d = driver.txt2img(seed=7, prompt="something else entirely").images[0].tobytes()
    assert a == b
    assert a != c and a != d


def test_infotext_contains_extra_params_and_round_trips(webui):
    class Writer(scripts.Script):
        def title(self):
            return "Writer"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process(self, p, *args):
            p.extra_generation_params["Adapter 1"] = 'depth, w: "0.5"'
            p.extra_generation_params["Adapter weight"] = 0.8

    driver.build_runners([Writer, Second])
    res = driver.txt2img(prompt="a cat", negative_prompt="blurry", batch_size=2, alwayson_scripts={"Second": ["x: y"]})
    text = res.infotexts[1]
    assert 'Adapter 1: "depth, w: \\"0.5\\""' in text and "Adapter weight: 0.8" in text
    assert 'Second text: "x: y"' in text and "Second list: img1" in text
    parsed = infotext_utils.parse_generation_parameters(text)
    assert parsed["Adapter 1"] == 'depth, w: "0.5"'
    assert parsed["Adapter weight"] == "0.8" and parsed["Second text"] == "x: y"
    assert parsed["Prompt"] == "a cat" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Seed"]) == ("64", "64", "2")


def test_script_args_slices_and_state(webui):
    t2i = scripts.scripts_txt2img
    rec, second = t2i.alwayson_scripts
    assert (rec.args_from, rec.args_to, second.args_from, second.args_to) == (1, 3, 3, 4)
    assert driver.default_script_args(t2i) == [0, False, 0.5, "default text"]
    res = driver.txt2img(alwayson_scripts={"Second": ["hello"]})
    assert Recorder.calls[0][1] == (False, 0.5)
    assert "Second text: hello" in res.infotexts[0]
    assert shared.state.job_count == 0 and shared.state.sampling_steps == 4


def test_sdxl_tiny_model_layout_and_generation(tmp_path):
    driver.reset_webui(tmp_path)
    model = driver.load_tiny_model("sdxl", seed=3)
    try:
        assert model.is_sdxl and not model.is_sd1 and len(model.model.diffusion_model.input_blocks) == 9
        cond = model.get_learned_conditioning(["a", "b"])
        assert cond["crossattn"].shape == (2, 77, 32) and cond["vector"].shape == (2, 64)
        assert not hasattr(model, "q_sample")  # sgm's DiffusionEngine has none
        res = driver.txt2img(batch_size=2, steps=2)
        assert len(res.images) == 2
    finally:
        driver.reset_webui()


def test_support_modules(tmp_path):
    import launch
    from modules import launch_utils, paths_internal

    launch_utils.reset_calls()
    launch.run_pip("install some-package==1.0", "some-package")
    assert [c.command for c in launch_utils.run_pip_calls] == ["install some-package==1.0"]
    assert launch.is_installed("torch") and not launch.is_installed("surely-not-installed-package")

    paths_internal.configure(tmp_path / "webui")
    assert paths.models_path == shared.models_path == str(tmp_path / "webui" / "models")
    assert shared.cmd_opts.lora_dir == str(tmp_path / "webui" / "models" / "Lora")

    changes = []
    shared.opts.add_option("stub_test_key", shared.OptionInfo(3, "Label", onchange=lambda: changes.append(1)).info("x").needs_reload_ui())
    assert shared.opts.stub_test_key == 3 and shared.opts.set("stub_test_key", 4) and changes == [1]

    from modules import call_queue

    def job(id_task, value):
        assert call_queue.queue_lock.locked() and shared.state.job == id_task
        return value, "<html>"

    assert call_queue.wrap_gradio_gpu_call(job)("task(abc)", 5)[0] == 5
    assert call_queue.wrap_gradio_gpu_call(lambda: 1 / 0, extra_outputs=[None])()[0] is None  # error -> extra outputs + html
    assert not call_queue.queue_lock.locked() and shared.state.job == ""

    import modules.generation_parameters_copypaste as old_name
    assert old_name is infotext_utils

    order = []
    script_callbacks.on_script_unloaded(lambda: order.append("first"))
    script_callbacks.on_script_unloaded(lambda: order.append("second"))
    script_callbacks.script_unloaded_callback()
    assert order == ["second", "first"]
    script_callbacks.remove_current_script_callbacks()
    assert script_callbacks.callback_map["callbacks_script_unloaded"] == []
    driver.reset_webui()


def test_load_script_file_like_the_webui_loader(tmp_path, sd1_model):
    from modules import script_loading

    driver.reset_webui(tmp_path)
    ext = tmp_path / "extensions" / "my-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "my_ext_lib.py").write_text("VALUE = 41\n")
    (ext / "scripts" / "my_script.py").write_text(
        "import my_ext_lib\n"
        "from modules import scripts, script_callbacks\n"
        "BASEDIR = scripts.basedir()\n"
        "class Plus(scripts.Script):\n"
        "    def title(self): return 'Plus'\n"
        "    def show(self, is_img2img): return scripts.AlwaysVisible\n"
        "    def process(self, p, *args): p.extra_generation_params['Plus'] = my_ext_lib.VALUE + 1\n"
        "script_callbacks.on_model_loaded(lambda m: None)\n")
    syspath = list(sys.path)
    module = script_loading.load_script_file(str(ext / "scripts" / "my_script.py"))
    assert module.__name__ == "my_script.py" and module.BASEDIR == str(ext) and sys.path == syspath
    assert scripts.basedir() == paths.script_path
    assert script_callbacks.callback_map["callbacks_model_loaded"][0].name == "my-ext/my_script.py/model_loaded"
    driver.load_tiny_model(model=sd1_model)
    driver.build_runners(None)
    assert "Plus: 42" in driver.txt2img(steps=1).infotexts[0]
    sys.modules.pop("my_ext_lib", None)
    driver.reset_webui()

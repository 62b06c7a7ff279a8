"""Test helpers that drive the fake WebUI the way its entry points do (``txt2img.py``, ``img2img.py``,
``api/api.py``): install a tiny model, build script runners, create a processing object, set
``p.scripts`` then ``p.script_args`` (which runs ``setup``), and run ``process_images`` between
``state.begin`` and ``state.end``.

Typical use::

    import driver
    driver.reset_webui(tmp_path)                       # fresh opts/state/callbacks/paths
    model = driver.load_tiny_model("sd1")              # shared.sd_model + on_model_loaded callbacks
    driver.build_runners([MyScript])                   # scripts.scripts_txt2img / scripts_img2img
                                                       # (None: classes loaded by script_loading.load_script_file)
    processed = driver.txt2img(alwayson_scripts={"My Script": [True, 0.5]}, enable_hr=True)

Defaults keep runs tiny: 64x64, 4 steps, seed 1, Euler, CFG 7, nothing saved to disk.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from modules import (
    paths_internal, processing, script_callbacks, scripts, sd_hijack, sd_models, shared,
)

DEFAULTS: dict[str, Any] = dict(prompt="a tiny photo", negative_prompt="", seed=1, steps=4, cfg_scale=7.0, width=64,
                                height=64, sampler_name="Euler", batch_size=1, n_iter=1, do_not_save_samples=True,
                                do_not_save_grid=True)


def reset_webui(root: str | os.PathLike | None = None) -> None:
    """Fresh global state: callbacks cleared, options back to defaults, new ``State``, no runners,
    no model (none kept in the loaded-models list either), cond caches emptied; with ``root`` the paths are moved there (``paths_internal.configure``)."""
    if root is not None:
        paths_internal.configure(root)
    script_callbacks.clear_callbacks()
    shared.opts.data = {k: v.default for k, v in shared.opts.data_labels.items() if not v.do_not_save}
    shared.state.__dict__.clear()  # in place: modules hold `from modules.shared import state`
    shared.state.__init__()
    scripts.scripts_txt2img = None
    scripts.scripts_img2img = None
    scripts.scripts_data.clear()
    shared.sd_model = None
    sd_models.model_data.loaded_sd_models.clear()  # the WebUI's list of loaded models: else every test's stays alive
    processing.StableDiffusionProcessing.cached_c[:] = [None, None]
    processing.StableDiffusionProcessing.cached_uc[:] = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c[:] = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc[:] = [None, None]


def load_tiny_model(arch: str = "sd1", seed: int = 0, *, model=None, fire_callbacks: bool = True):
    """Install ``model`` (or a fresh ``build_tiny_sd_model(arch, seed)``) as ``shared.sd_model`` the way
    ``sd_models.load_model`` finishes: register its checkpoint, hijack, ``model_loaded_callback``."""
    from tiny_model import build_tiny_sd_model
    model = model if model is not None else build_tiny_sd_model(arch, seed)
    model.sd_checkpoint_info.register()
    shared.opts.data["sd_model_checkpoint"] = model.sd_checkpoint_info.title
    shared.sd_model = model
    sd_hijack.model_hijack.hijack(model)
    if fire_callbacks:
        script_callbacks.model_loaded_callback(model)
    return model


def build_runner(script_classes: Iterable[type] | None, *, is_img2img: bool) -> scripts.ScriptRunner:
    """Instantiate the scripts for one tab and build their UI inside a throwaway ``gr.Blocks``.

    ``script_classes=None`` uses every class registered by ``script_loading.load_script_file``."""
    import gradio as gr
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(is_img2img, None if script_classes is None else list(script_classes))
    with gr.Blocks():
        runner.prepare_ui()
        runner.setup_ui()
    return runner


def build_runners(script_classes: Iterable[type] | None = None) -> tuple[scripts.ScriptRunner, scripts.ScriptRunner]:
    """Build txt2img and img2img runners and install them as ``scripts.scripts_txt2img``/``scripts_img2img``."""
    classes = None if script_classes is None else list(script_classes)
    scripts.scripts_txt2img = build_runner(classes, is_img2img=False)
    scripts.scripts_img2img = build_runner(classes, is_img2img=True)
    return scripts.scripts_txt2img, scripts.scripts_img2img


def default_script_args(runner: scripts.ScriptRunner, overrides: dict[str, list] | None = None) -> list:
    """The flat ``script_args`` a request would carry: every component's ``.value`` (index 0 = 0, no
    selectable script), then ``overrides`` by script title like the API's ``alwayson_scripts``
    (``{"Title": [arg0, arg1, ...]}``; missing trailing args keep their defaults)."""
    args: list = [0] + [getattr(c, "value", None) for c in runner.inputs[1:]]
    for title, values in (overrides or {}).items():
        script = runner.script(title)
        if script is None or not script.alwayson:
            raise KeyError(f"always-on script not found: {title}")
        for i, value in enumerate(values[: script.args_to - script.args_from]):
            args[script.args_from + i] = value
    return args


def _outpaths(tab: str) -> dict[str, str]:
    """Where txt2img.py/img2img.py point ``outpath_samples``/``outpath_grids`` (under the data dir)."""
    root = paths_internal.data_path
    return {"outpath_samples": os.path.join(root, shared.opts.outdir_samples or getattr(shared.opts, f"outdir_{tab}_samples")),
            "outpath_grids": os.path.join(root, shared.opts.outdir_grids or getattr(shared.opts, f"outdir_{tab}_grids"))}


def make_txt2img(**kwargs) -> processing.StableDiffusionProcessingTxt2Img:
    """A txt2img processing object with :data:`DEFAULTS` overridden by ``kwargs`` (real keyword names)."""
    params = {**DEFAULTS, **_outpaths("txt2img"), **kwargs}
    return processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **params)


def make_img2img(init_images: list, **kwargs) -> processing.StableDiffusionProcessingImg2Img:
    """An img2img processing object (``denoising_strength`` 0.75 unless given)."""
    params = {**DEFAULTS, **_outpaths("img2img"), "denoising_strength": 0.75, **kwargs}
    return processing.StableDiffusionProcessingImg2Img(sd_model=shared.sd_model, init_images=init_images, **params)


def run_processing(p: processing.StableDiffusionProcessing, *, runner: scripts.ScriptRunner | None = None,
                   script_args: list | None = None, alwayson_scripts: dict[str, list] | None = None,
                   is_api: bool = False, job: str | None = None) -> processing.Processed:
    """Attach ``runner`` (default: the tab's global runner) and its args, then run like the WebUI.

    ``script_args`` is the full flat list; otherwise it is built from component defaults plus
    ``alwayson_scripts`` (``{"Script title": [args...]}``, API style)."""
    is_img2img = isinstance(p, processing.StableDiffusionProcessingImg2Img)
    if runner is None:
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
    p.is_api = is_api
    if runner is not None:
        p.scripts = runner
        p.script_args = tuple(script_args if script_args is not None else default_script_args(runner, alwayson_scripts))
    shared.state.begin(job=job or ("scripts_img2img" if is_img2img else "scripts_txt2img"))
    try:
        return processing.process_images(p)
    finally:
        p.close()
        shared.state.end()


def txt2img(*, script_args: list | None = None, alwayson_scripts: dict[str, list] | None = None, is_api: bool = False,
            **kwargs) -> processing.Processed:
    """Run txt2img (``enable_hr=True, hr_scale=..., denoising_strength=...`` for the hires fix)."""
    return run_processing(make_txt2img(**kwargs), script_args=script_args, alwayson_scripts=alwayson_scripts, is_api=is_api)


def img2img(init_images: list, *, script_args: list | None = None, alwayson_scripts: dict[str, list] | None = None,
            is_api: bool = False, **kwargs) -> processing.Processed:
    """Run img2img on PIL ``init_images`` (``mask=<PIL L image>`` for inpainting, white = repaint)."""
    return run_processing(make_img2img(init_images, **kwargs), script_args=script_args,
                          alwayson_scripts=alwayson_scripts, is_api=is_api)


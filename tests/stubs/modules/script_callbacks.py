"""Fake of ``modules/script_callbacks.py``: callback registration and the ``*_callback`` invokers.

Same registration functions, parameter classes and invokers as v1.10.1. Each invoker calls the
callbacks in registration order (the real one may reorder them from extension metadata or user
settings ``prioritized_callbacks_<category>``; the latter is honoured here) and wraps each call in
try/except that reports through ``errors.report`` and goes on. ``script_unloaded_callback`` and
``before_ui_callback`` run in reverse order, as in the real module.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable

from modules import errors


def report_exception(c: "ScriptCallback", job: str) -> None:
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        """Latent rows going into the UNet: cond rows first, then one uncond row per image"""
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser
        """The CFGDenoiser (``.step``, ``.total_steps``, ``.p``...)"""


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


class ImageGridLoopParams:
    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class BeforeTokenCounterParams:
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def _caller_filename() -> str:
    stack = [x for x in inspect.stack() if x.filename != __file__]
    return stack[0].filename if stack else "unknown file"


def _extension_name(filename: str) -> str:
    from modules import paths_internal
    for root in (paths_internal.extensions_dir, paths_internal.extensions_builtin_dir):
        rel = os.path.relpath(os.path.abspath(filename), root)
        if not rel.startswith(".."):
            return rel.split(os.sep)[0].lower()
    return "base"


def add_callback(callbacks: list, fun: Callable, *, name: str | None = None, category: str = "unknown",
                 filename: str | None = None) -> None:
    """Append a uniquely named ``ScriptCallback`` (``<extension>/<file>/<category>[/<name>]``)."""
    filename = filename or _caller_filename()
    callback_name = f"{_extension_name(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"
    unique = callback_name
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def sort_callbacks(category: str, unordered_callbacks: list, *, enable_user_sort: bool = True) -> list:
    callbacks = unordered_callbacks.copy()
    if enable_user_sort:
        from modules import shared
        for name in reversed(getattr(shared.opts, "prioritized_callbacks_" + category, [])):
            index = next((i for i, c in enumerate(callbacks) if c.name == name), None)
            if index is not None:
                callbacks.insert(0, callbacks.pop(index))
    return callbacks


def ordered_callbacks(category: str, unordered_callbacks: list | None = None, *, enable_user_sort: bool = True) -> list:
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    return sort_callbacks(category, unordered_callbacks, enable_user_sort=enable_user_sort)


def enumerate_callbacks():
    for category, callbacks in callback_map.items():
        yield (category[10:] if category.startswith("callbacks_") else category), callbacks


callback_map: dict[str, list[ScriptCallback]] = {f"callbacks_{c}": [] for c in (
    "app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved", "image_saved",
    "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component", "after_component",
    "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload", "list_optimizers", "list_unets",
    "before_token_counter",
)}
ordered_callbacks_map: dict[str, list] = {}


def clear_callbacks() -> None:
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _invoke(category: str, job: str, *args, reverse: bool = False) -> list:
    results = []
    callbacks = ordered_callbacks(category)
    for c in reversed(callbacks) if reverse else callbacks:
        try:
            results.append(c.callback(*args))
        except Exception:
            report_exception(c, job)
    return results


def app_started_callback(demo, app) -> None:
    _invoke("app_started", "app_started_callback", demo, app)


def app_reload_callback() -> None:
    _invoke("on_reload", "callbacks_on_reload")


def model_loaded_callback(sd_model) -> None:
    _invoke("model_loaded", "model_loaded_callback", sd_model)


def ui_tabs_callback() -> list:
    res: list = []
    for r in _invoke("ui_tabs", "ui_tabs_callback"):
        res += r or []
    return res


def ui_train_tabs_callback(params: UiTrainTabParams) -> None:
    _invoke("ui_train_tabs", "callbacks_ui_train_tabs", params)


def ui_settings_callback() -> None:
    _invoke("ui_settings", "ui_settings_callback")


def before_image_saved_callback(params: ImageSaveParams) -> None:
    _invoke("before_image_saved", "before_image_saved_callback", params)


def image_saved_callback(params: ImageSaveParams) -> None:
    _invoke("image_saved", "image_saved_callback", params)


def extra_noise_callback(params: ExtraNoiseParams) -> None:
    _invoke("extra_noise", "callbacks_extra_noise", params)


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    _invoke("cfg_denoiser", "cfg_denoiser_callback", params)


def cfg_denoised_callback(params: CFGDenoisedParams) -> None:
    _invoke("cfg_denoised", "cfg_denoised_callback", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams) -> None:
    _invoke("cfg_after_cfg", "cfg_after_cfg_callback", params)


def before_component_callback(component, **kwargs) -> None:
    for c in ordered_callbacks("before_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "before_component_callback")


def after_component_callback(component, **kwargs) -> None:
    for c in ordered_callbacks("after_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "after_component_callback")


def image_grid_callback(params: ImageGridLoopParams) -> None:
    _invoke("image_grid", "image_grid", params)


def infotext_pasted_callback(infotext: str, params: dict[str, Any]) -> None:
    _invoke("infotext_pasted", "infotext_pasted", infotext, params)


def script_unloaded_callback() -> None:
    _invoke("script_unloaded", "script_unloaded", reverse=True)


def before_ui_callback() -> None:
    _invoke("before_ui", "before_ui", reverse=True)


def list_optimizers_callback() -> list:
    res: list = []
    _invoke("list_optimizers", "list_optimizers", res)
    return res


def list_unets_callback() -> list:
    res: list = []
    _invoke("list_unets", "list_unets", res)
    return res


def before_token_counter_callback(params: BeforeTokenCounterParams) -> None:
    _invoke("before_token_counter", "before_token_counter", params)


def remove_current_script_callbacks() -> None:
    """Remove every callback registered from the calling file."""
    filename = _caller_filename()
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        for c in [c for c in callback_list if c.script == filename]:
            callback_list.remove(c)


def remove_callbacks_for_function(callback_func: Callable) -> None:
    for callback_list in callback_map.values():
        for c in [c for c in callback_list if c.callback == callback_func]:
            callback_list.remove(c)


def _register(category: str, key: str | None = None):
    def register(callback: Callable, *, name: str | None = None) -> None:
        add_callback(callback_map[f"callbacks_{key or category}"], callback, name=name, category=category,
                     filename=_caller_filename())
    register.__name__ = f"on_{category}"
    register.__doc__ = f"Register ``callback`` for the ``{category}`` event (see the module table in the research notes)."
    return register


on_app_started = _register("app_started")
on_before_reload = _register("on_reload")
on_model_loaded = _register("model_loaded")
on_ui_tabs = _register("ui_tabs")
on_ui_train_tabs = _register("ui_train_tabs")
on_ui_settings = _register("ui_settings")
on_before_image_saved = _register("before_image_saved")
on_image_saved = _register("image_saved")
on_extra_noise = _register("extra_noise")
on_cfg_denoiser = _register("cfg_denoiser")
on_cfg_denoised = _register("cfg_denoised")
on_cfg_after_cfg = _register("cfg_after_cfg")
on_before_component = _register("before_component")
on_after_component = _register("after_component")
on_image_grid = _register("image_grid")
on_infotext_pasted = _register("infotext_pasted")
on_script_unloaded = _register("script_unloaded")
on_before_ui = _register("before_ui")
on_list_optimizers = _register("list_optimizers")
on_list_unets = _register("list_unets")
on_before_token_counter = _register("before_token_counter")

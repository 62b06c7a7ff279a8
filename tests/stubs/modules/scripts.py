"""Fake of ``modules/scripts.py``: the ``Script`` base class, ``ScriptRunner`` and script loading.

Kept from v1.10.1: the full ``Script`` attribute/method set; ``args_from``/``args_to`` assigned from
the flat list of UI inputs (index 0 is the selectable-script dropdown), built inside ``gr.Blocks``;
hook dispatch only to *alwayson* scripts whose class overrides the hook, in load order, each call
in try/except -> ``errors.report``; ``p.script_args[args_from:args_to]`` slicing; ``basedir()`` valid
while a script file is imported by :func:`load_script_file`. Left out: UI sections (every alwayson
script is laid out in the default area), extension metadata ordering, ``api_info``.

Test helpers live elsewhere: ``script_loading.load_script_file`` imports an extension's script file
like the WebUI loader; ``driver.build_runners``/``driver.default_script_args`` build runners and args.
"""
from __future__ import annotations

import re
import sys
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Iterable

from modules import errors, paths

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


@dataclass
class OnComponent:
    component: Any


class Script:
    """Base class of every WebUI script; hooks receive the values of the ``ui()`` components as ``*args``."""

    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def on_before_component(self, callback, *, elem_id):
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        return ""

    def elem_id(self, item_id):
        """``script_[txt2img_|img2img_]<title>_<item_id>``; the tab name only when shown on both tabs."""
        need_tabname = self.show(True) == self.show(False)
        tabname = f"{'img2img' if self.is_img2img else 'txt2img'}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"

    def before_hr(self, p, *args):
        pass


class ScriptBuiltinUI(Script):
    setup_for_ui_only = True

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = ("img2img" if self.is_img2img else "txt2img") + "_" if need_tabname else ""
        return f"{tabname}{item_id}"

    def show(self, is_img2img):
        return AlwaysVisible


current_basedir: str | None = None
"""Set while ``script_loading.load_script_file`` imports a script (the real module starts with ``paths.script_path``)."""


def basedir() -> str:
    """The directory of the extension whose script is being imported (the WebUI root otherwise)."""
    return current_basedir if current_basedir is not None else paths.script_path


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list[ScriptClassData] = []


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    """Holds the scripts of one tab and dispatches processing hooks to the alwayson ones."""

    def __init__(self):
        self.scripts: list[Script] = []
        self.selectable_scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []
        self.titles: list[str] = []
        self.title_map: dict[str, Script] = {}
        self.infotext_fields: list = []
        self.paste_field_names: list[str] = []
        self.inputs: list = [None]

    def initialize_scripts(self, is_img2img: bool, script_classes: Iterable[type] | None = None) -> None:
        """Instantiate ``script_classes`` (default: every class in ``scripts_data``) for this tab."""
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        if script_classes is None:
            entries = list(scripts_data)
        else:
            entries = [ScriptClassData(c, getattr(sys.modules.get(c.__module__), "__file__", None) or c.__module__, None, None)
                       for c in script_classes]
        for entry in entries:
            try:
                script = entry.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {entry.script_class}: ", exc_info=True)
                continue
            script.filename = entry.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script: Script) -> None:
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
            script.controls = controls
            if controls is None:
                return
            script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
            if script.infotext_fields is not None:
                self.infotext_fields += script.infotext_fields
            if script.paste_field_names is not None:
                self.paste_field_names += script.paste_field_names
            self.inputs += controls
            script.args_to = len(self.inputs)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def setup_ui_for_section(self, section, scriptlist: list[Script] | None = None) -> None:
        import gradio as gr
        for script in self.alwayson_scripts if scriptlist is None else scriptlist:
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self) -> None:
        self.inputs = [None]

    def setup_ui(self) -> list:
        """Create every script's UI (call inside ``gr.Blocks``); returns the flat inputs list."""
        import gradio as gr
        titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {title.lower(): s for title, s in zip(titles, self.scripts)}
        self.titles = [wrap_call(s.title, s.filename, "title") or f"{s.filename} [error]" for s in self.selectable_scripts]
        self.setup_ui_for_section(None)
        self.inputs[0] = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles,
                                     value="None", type="index")
        self.setup_ui_for_section(None, self.selectable_scripts)
        return self.inputs

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    def ordered_scripts(self, method_name: str) -> list[Script]:
        """Alwayson scripts (all scripts for component hooks) whose class overrides ``method_name``."""
        pool = self.scripts if method_name in ("before_component", "after_component") else self.alwayson_scripts
        return [s for s in pool if getattr(type(s), method_name, None) is not getattr(Script, method_name, None)]

    def _dispatch(self, method_name: str, p, *extra, **kwargs) -> None:
        """``script.<method>(p, *extra, *p.script_args[args_from:args_to], **kwargs)`` for each script."""
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *extra, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._dispatch("before_process", p)

    def process(self, p):
        self._dispatch("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._dispatch("process_before_every_sampling", p, **kwargs)

    def before_process_batch(self, p, **kwargs):
        self._dispatch("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._dispatch("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._dispatch("process_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._dispatch("postprocess", p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        self._dispatch("postprocess_batch", p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._dispatch("postprocess_batch_list", p, pp, **kwargs)

    def post_sample(self, p, ps: PostSampleArgs):
        self._dispatch("post_sample", p, ps)

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._dispatch("on_mask_blend", p, mba)

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._dispatch("postprocess_image", p, pp)

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        self._dispatch("postprocess_maskoverlay", p, ppmo)

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        self._dispatch("postprocess_image_after_composite", p, pp)

    def before_hr(self, p):
        self._dispatch("before_hr", p)

    def setup_scrips(self, p, *, is_ui: bool = True):  # sic: the real method name has this typo
        for script in self.ordered_scripts("setup"):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_component(self, component, **kwargs):
        self._component_hook("before_component", component, **kwargs)

    def after_component(self, component, **kwargs):
        self._component_hook("after_component", component, **kwargs)

    def _component_hook(self, method_name: str, component, **kwargs) -> None:
        for script in self.ordered_scripts(method_name):
            try:
                getattr(script, method_name)(component, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def script(self, title: str):
        return self.title_map.get(title.lower())


scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None
scripts_postproc = None
scripts_current: ScriptRunner | None = None

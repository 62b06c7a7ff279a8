"""The "Adapters" accordion on txt2img and img2img: an AlwaysVisible script with N units.

Each unit's fields feed one ``gr.State`` holding the unit as a dict, so the script receives one
argument per unit: the same shape the web API sends (``{"adapters": {"args": [{...}, {...}]}}``).
Validation happens once, in ``AdapterUnit.from_value``, when the generation starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules import script_callbacks, scripts
from modules.ui_components import ToolButton

from ...errors import AdapterError
from ...inference.blocks import BlockPreset
from ...inference.units import FIELD_ORDER, NO_MODEL, AdapterUnit, ControlMode, MultiImage
from ...models.clip_vision import CropMode
from ...preprocess.registry import get_preprocessor, list_preprocessors
from ...preprocess.resize import ResizeMode
from ..gradio_compat import image_source
from . import SharedResources, host_of, infotext, resources, settings
from .faceid_ui import faceid_options
from .generation import GenerationController

log = logging.getLogger("adapters")


def _threshold_updates(name: str, current_a: float = -1, current_b: float = -1) -> tuple[dict, dict]:
    """Slider settings for a preprocessor; a current value that fits its range is kept (a pasted
    infotext sets the thresholds and the preprocessor together, in either order)."""
    try:
        pre = get_preprocessor(name)
    except AdapterError:
        return gr.update(visible=False), gr.update(visible=False)
    out = []
    for spec, current in ((pre.threshold_a, current_a), (pre.threshold_b, current_b)):
        if spec is None:
            out.append(gr.update(visible=False, value=-1))
            continue
        keep = current is not None and current != -1 and spec.minimum <= float(current) <= spec.maximum
        out.append(gr.update(visible=True, label=spec.label, minimum=spec.minimum, maximum=spec.maximum,
                             step=spec.step, value=float(current) if keep else spec.default))
    return out[0], out[1]


def _controller(res: SharedResources) -> GenerationController:
    cfg = settings.current()
    return GenerationController(res.catalog, res.adapters, res.preprocessors, cfg.annotator_dir, res.encoders,
                                res.encodings, cfg.max_image_pixels, res.faces(cfg), cfg.lora_dirs)


def _unit_value(*values: Any) -> dict:
    """The unit dict from the field components, the extra reference images appended to ``image``. Those
    stay encoded (the file's bytes): they are measured and decoded at generation, like the API's base64."""
    *ordered, extra_files = values
    unit = dict(zip(FIELD_ORDER, ordered))
    if extra_files:
        extra = [Path(getattr(f, "name", f)).read_bytes() for f in extra_files]
        unit["image"] = [i for i in [unit["image"], *extra] if i is not None]
    return unit


class AdaptersScript(scripts.Script):
    def __init__(self) -> None:
        self._controller: GenerationController | None = None
        script_callbacks.on_cfg_denoiser(self._on_cfg_denoiser)
        script_callbacks.on_script_unloaded(self._end)
        script_callbacks.on_model_loaded(lambda _model: self._end())

    def title(self) -> str:
        return "Adapters"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    # UI --------------------------------------------------------------------------------------
    def ui(self, is_img2img: bool) -> list:
        res = resources()
        states = []
        self.infotext_fields = []
        self.paste_field_names = []
        with gr.Accordion("Adapters", open=False, elem_id=self.elem_id("accordion")):
            with gr.Tabs():
                for index in range(settings.current().unit_count):
                    with gr.Tab(f"Unit {index + 1}"):
                        states.append(self._unit_ui(index, res))
        return states

    def _unit_ui(self, index: int, res: SharedResources) -> gr.State:
        default = AdapterUnit()
        eid = lambda name: self.elem_id(f"unit{index + 1}_{name}")  # noqa: E731
        with gr.Row():
            image = gr.Image(label="Condition image", type="numpy", elem_id=eid("image"), **image_source("upload"))
            preview = gr.Image(label="Preprocessed", interactive=False, elem_id=eid("preview"))
        enabled = gr.Checkbox(label="Enable", value=False, elem_id=eid("enabled"))
        with gr.Row():
            preprocessor = gr.Dropdown(label="Preprocessor", value=default.preprocessor,
                                       choices=[p.name for p in list_preprocessors()], elem_id=eid("preprocessor"))
            preview_button = ToolButton(value="\U0001F4A5", elem_id=eid("preview_button"))
            model = gr.Dropdown(label="Model", value=NO_MODEL, choices=res.model_choices(), elem_id=eid("model"))
            refresh = ToolButton(value="\U0001F504", elem_id=eid("refresh"))
        with gr.Row():
            weight = gr.Slider(label="Weight", minimum=0.0, maximum=2.0, step=0.05, value=default.weight,
                               elem_id=eid("weight"))
            start = gr.Slider(label="Start", minimum=0.0, maximum=1.0, step=0.01, value=0.0, elem_id=eid("start"))
            end = gr.Slider(label="End", minimum=0.0, maximum=1.0, step=0.01, value=1.0, elem_id=eid("end"))
        with gr.Row():
            resolution = gr.Slider(label="Preprocessor resolution", minimum=64, maximum=2048, step=8,
                                   value=default.resolution, elem_id=eid("resolution"))
            threshold_a = gr.Slider(label="Threshold A", minimum=-1, maximum=255, value=-1, visible=False,
                                    elem_id=eid("threshold_a"))
            threshold_b = gr.Slider(label="Threshold B", minimum=-1, maximum=255, value=-1, visible=False,
                                    elem_id=eid("threshold_b"))
        control_mode = gr.Radio(label="Control mode (T2I-Adapter)", choices=[m.value for m in ControlMode],
                                value=default.control_mode.value, elem_id=eid("control_mode"))
        resize_mode = gr.Radio(label="Resize mode (T2I-Adapter)", choices=[m.value for m in ResizeMode],
                               value=default.resize_mode.value, elem_id=eid("resize_mode"))
        with gr.Accordion("IP-Adapter options", open=False):
            extra_images = gr.File(label="More reference images", file_count="multiple", file_types=["image"],
                                   elem_id=eid("extra_images"))
            with gr.Row():
                block_preset = gr.Dropdown(label="Blocks", choices=[b.value for b in BlockPreset],
                                           value=default.block_preset.value, elem_id=eid("block_preset"))
                composition_weight = gr.Slider(label="Composition weight", minimum=0.0, maximum=2.0, step=0.05,
                                               value=default.composition_weight, elem_id=eid("composition_weight"))
            with gr.Row():
                multi_image = gr.Radio(label="Several images", choices=[m.value for m in MultiImage],
                                       value=default.multi_image.value, elem_id=eid("multi_image"))
                crop = gr.Radio(label="Image to encoder", choices=[c.value for c in CropMode],
                                value=default.crop.value, elem_id=eid("crop"))
            mask = gr.Image(label="Attention mask (white: where the image prompt acts)", type="numpy",
                            elem_id=eid("mask"), **image_source("upload"))
        faceid = faceid_options(eid, default, settings.current().models_dir)

        fields = dict(enabled=enabled, model=model, preprocessor=preprocessor, weight=weight, start=start, end=end,
                      control_mode=control_mode, resize_mode=resize_mode, resolution=resolution,
                      threshold_a=threshold_a, threshold_b=threshold_b, image=image, block_preset=block_preset,
                      composition_weight=composition_weight, multi_image=multi_image, crop=crop, mask=mask, **faceid)
        ordered = [fields[name] for name in FIELD_ORDER]
        state = gr.State(default.to_dict())
        for component in ordered + [extra_images]:
            component.change(fn=_unit_value, inputs=ordered + [extra_images], outputs=[state], show_progress=False)
        preprocessor.change(fn=_threshold_updates, inputs=[preprocessor, threshold_a, threshold_b],
                            outputs=[threshold_a, threshold_b],
                            show_progress=False)
        refresh.click(fn=lambda: gr.update(choices=resources().model_choices(refresh=True)), outputs=[model])
        preview_button.click(fn=self._preview, inputs=[state], outputs=[preview])

        self.infotext_fields.append((enabled, infotext.field_key(index, "Enabled")))
        labels = infotext.LABELS.items()
        for name, label in labels:
            self.infotext_fields.append((fields[name], infotext.field_key(index, label)))
        self.paste_field_names += [key for _, key in self.infotext_fields[-len(labels) - 1:]]
        return state

    def _preview(self, value: dict) -> Any:
        res = resources()
        try:
            unit = AdapterUnit.from_value(value)
            if unit.image is None:
                raise AdapterError("upload a condition image first")
            return _controller(res).inputs().condition(unit, unit.images[0])
        except AdapterError as exc:
            raise gr.Error(str(exc)) from exc

    # generation ------------------------------------------------------------------------------
    def process(self, p: Any, *units: Any) -> None:
        res = resources()
        res.bind_host(host_of(p))
        if self._controller is None or self._controller.adapters is not res.adapters:
            self._controller = _controller(res)
        cfg = settings.current()
        self._controller.annotator_dir, self._controller.max_image_pixels = cfg.annotator_dir, cfg.max_image_pixels
        self._controller.faces, self._controller.lora_dirs = res.faces(cfg), cfg.lora_dirs
        self._controller.start(p, units)
        if self._controller.session is not None:
            # postprocess() is skipped when sampling raises, but txt2img, img2img and the API all run
            # the job inside `closing(p)`: ending the session in p.close() restores the UNet anyway.
            close = p.close

            def close_and_restore() -> None:
                self._end()
                close()

            p.close = close_and_restore

    def process_before_every_sampling(self, p: Any, *units: Any, **kwargs: Any) -> None:
        # Forge: the units built in process() go onto this pass's UNet patcher; nothing on A1111
        if self._controller is not None:
            self._controller.before_sampling(p)

    def postprocess(self, p: Any, processed: Any, *units: Any) -> None:
        self._end()

    def _on_cfg_denoiser(self, params: Any) -> None:
        if self._controller is not None:
            self._controller.on_cfg_denoiser(params)

    def _end(self) -> None:
        if self._controller is not None:
            self._controller.end()

"""The "Train Adapter" tab's widgets (Gradio 3.41): ``widget(name)`` makes a request field's widget from the schema
(its label, default, choices: ``training.request.FIELDS``, so the tab shows what the API and the command line take
by default); the per-method groups (LoRA, T2I-Adapter, IP-Adapter), each split into the main knobs and the rarely
changed ones shown in the Advanced accordion; and the lists their file dropdowns offer.

The lists come from the Adapters panel's own places (``settings.current()``): adapter files as its
``ModelCatalog`` names them (models/adapters, adapter files of models/ControlNet), kept to the method's
family, so a name picked here is resolved by the job manager exactly as the panel resolves it; CLIP vision
files of its encoder folders; the preprocessors of its table. The dropdowns also take a typed path.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from modules.ui_components import FormRow, ToolButton

from ...catalog import ModelCatalog
from ...face.discovery import available_packs
from ...formats.detect import ModelFamily, detect_family
from ...formats.reader import MODEL_SUFFIXES, PICKLE_SUFFIXES, read_safetensors_keys
from ...models.ip_adapter import IPProjection
from ...preprocess.registry import list_preprocessors
from ...training.request import FIELDS, Kind
from ..panel import settings
from .view import AUTO_ENCODER, SCRATCH

log = logging.getLogger("adapters")

ELEM_PREFIX = "adapters_train"
_IP_NAME_HINTS = ("ip-adapter", "ip_adapter", "ipadapter")


def eid(name: str) -> str:
    return f"{ELEM_PREFIX}_{name}"


# lists -----------------------------------------------------------------------------------------------------------


def _family_of(path: Path) -> str:
    """"t2i", "ip" (IP-Adapters and FaceID: one IP method, the run's projection decides which it fine-tunes) or "" for
    an adapter file. A pickle's keys cannot be read without loading it: its name decides."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "ip" if any(h in path.name.lower() for h in _IP_NAME_HINTS) else "t2i"
    try:
        family = detect_family({k: None for k in read_safetensors_keys(path)})[0]
    except Exception:  # noqa: BLE001  (an unreadable file is simply not offered; the panel reports it on load)
        return ""
    return "t2i" if family.is_t2i else "ip" if family in (ModelFamily.IP_ADAPTER, ModelFamily.IP_FACEID) else ""


def adapter_choices(method: str) -> list[str]:
    """SCRATCH, then the panel's adapter names of ``method``'s family ("t2i_adapter" or "ip_adapter")."""
    want = "t2i" if method == "t2i_adapter" else "ip"
    try:
        cfg = settings.current()
        catalog = ModelCatalog(cfg.model_dirs, cfg.shared_model_dirs)
        names = [n for n in catalog.refresh() if _family_of(catalog.resolve(n)) == want]
    except Exception:  # noqa: BLE001  (a listing problem must not take the tab down: a path can still be typed)
        log.warning("Train Adapter: could not list the adapter files", exc_info=True)
        names = []
    return [SCRATCH] + names


def encoder_choices() -> list[str]:
    """AUTO_ENCODER, then the file names in the panel's CLIP vision folders (names only: no file is read)."""
    try:
        folders = settings.current().encoder_dirs
        names = sorted({p.name for f in folders if Path(f).is_dir() for p in Path(f).rglob("*")
                        if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES}, key=str.lower)
    except Exception:  # noqa: BLE001  (as above)
        log.warning("Train Adapter: could not list the CLIP vision encoders", exc_info=True)
        names = []
    return [AUTO_ENCODER] + names


def preprocessor_choices() -> list[str]:
    return [p.name for p in list_preprocessors()]


# widgets -----------------------------------------------------------------------------------------------------------


def widget(name: str, component: Any = None, **overrides: Any) -> Any:
    """The widget of request field ``name`` with the schema's label and default: by default a checkbox, a dropdown of
    its choices, a number (0 for "none" where the field is optional, said in its label) or a textbox; ``component``
    and ``overrides`` change the widget, not what it means."""
    f = FIELDS[name]
    label = f.label
    if f.none and f.kind in (Kind.OPT_INT, Kind.OPT_FLOAT):
        label = f"{label} (0: {f.none})"
    elif f.none and f.kind is Kind.OPT_STR:
        label = f"{label} (empty: {f.none})"
    value = "" if f.default is MISSING else 0 if f.default is None else f.default
    args: dict[str, Any] = dict(label=label, value=list(value) if f.kind is Kind.STRS else value, elem_id=eid(name))
    if component is None:
        component, extra = _component(f)
        args.update(extra)
    args.update(overrides)
    return component(**args)


def _component(f) -> tuple[Any, dict[str, Any]]:
    if f.kind is Kind.BOOL:
        return gr.Checkbox, {}
    if f.choices:
        return gr.Dropdown, {"choices": list(f.choices)}
    if f.kind is Kind.STRS:
        return gr.Textbox, {"lines": 2, "value": ""}
    if f.kind.base is Kind.STR:
        return gr.Textbox, {}
    return gr.Number, {"precision": 0} if f.kind.base is Kind.INT else {}


def _file_dropdown(name: str, choices: list[str], first: str = "") -> Any:
    """A file field's dropdown: ``choices[0]`` stands for "" (``first`` says what that means), then the listed names;
    allow_custom_value: a path typed in is sent as it is (TrainRequest takes a listed name or a path)."""
    label = FIELDS[name].label + (f" ({first})" if first else "")
    return widget(name, gr.Dropdown, label=label, choices=choices, value=choices[0], allow_custom_value=True)


# groups ------------------------------------------------------------------------------------------------------------


def lora_main(i: dict[str, Any]) -> None:
    with FormRow():
        for name in ("rank", "alpha"):  # the usual range (the configs take more)
            i[name] = widget(name, gr.Slider, minimum=1, maximum=256, step=1)


def lora_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        i["lora_targets"] = widget("lora_targets")
        i["train_text_encoder"] = widget("train_text_encoder")


def t2i_main(i: dict[str, Any]) -> None:
    with FormRow():
        i["t2i_condition"] = widget("t2i_condition", max_lines=1)
        # the two valid counts (the dropdown sends text: the tab makes it an integer)
        i["t2i_condition_channels"] = widget("t2i_condition_channels", gr.Dropdown, choices=["3", "1"], value="3")
        i["t2i_adapter_kind"] = widget("t2i_adapter_kind")
    with FormRow():
        i["t2i_init_from"] = _file_dropdown("t2i_init_from", adapter_choices("t2i_adapter"))
        refresh = ToolButton("\U0001F504", elem_id=eid("t2i_refresh"))
        i["t2i_preprocessor"] = widget("t2i_preprocessor", gr.Dropdown, label=FIELDS["t2i_preprocessor"].label,
                                       value="none", choices=preprocessor_choices())
    refresh.click(fn=lambda: gr.update(choices=adapter_choices("t2i_adapter")), outputs=[i["t2i_init_from"]],
                  show_progress="hidden")


def t2i_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        for name in ("t2i_timesteps", "t2i_num_res_blocks", "t2i_export_layout"):
            i[name] = widget(name)


def face_pack_choices() -> list[str]:
    """The default pack, then the pack folders in the WebUI's models/insightface/models (names only)."""
    try:
        from modules import paths
        packs = available_packs(paths.models_path)
    except Exception:  # noqa: BLE001  (as above)
        log.warning("Train Adapter: could not list the face model packs", exc_info=True)
        packs = []
    return list(dict.fromkeys([FIELDS["ip_face_pack"].default] + packs))


def ip_main(i: dict[str, Any]) -> None:
    with FormRow():
        i["ip_projection"] = widget("ip_projection")
        i["ip_init_from"] = _file_dropdown("ip_init_from", adapter_choices("ip_adapter"))
        i["ip_image_encoder"] = _file_dropdown("ip_image_encoder", encoder_choices(), f"{AUTO_ENCODER}: as released")
        refresh = ToolButton("\U0001F504", elem_id=eid("ip_refresh"))
    faceid_default = FIELDS["ip_projection"].default == IPProjection.FACEID.value
    with FormRow(visible=faceid_default, elem_id=eid("ip_faceid")) as faceid:
        # FaceID reads faces, not CLIP features: its pack and LoRA, shown while the projection is faceid
        i["ip_face_pack"] = widget("ip_face_pack", gr.Dropdown, choices=face_pack_choices(), allow_custom_value=True)
        i["ip_lora_rank"] = widget("ip_lora_rank", gr.Slider, minimum=0, maximum=256, step=1)
    refresh.click(fn=lambda: (gr.update(choices=adapter_choices("ip_adapter")), gr.update(choices=encoder_choices()),
                              gr.update(choices=face_pack_choices())),
                  outputs=[i["ip_init_from"], i["ip_image_encoder"], i["ip_face_pack"]], show_progress="hidden")
    i["ip_projection"].change(fn=projection_changed, inputs=[i["ip_projection"]],
                              outputs=[faceid, i["ip_image_encoder"]], show_progress="hidden")


def projection_changed(projection: str) -> tuple[dict, dict]:
    """(the FaceID row, the CLIP encoder box): FaceID's pack and LoRA rank shown while the projection is faceid, the
    encoder, which FaceID does not read, while it is not."""
    faceid = projection == IPProjection.FACEID.value
    return gr.update(visible=faceid), gr.update(visible=not faceid)


def ip_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        for name in ("ip_image_drop", "ip_text_drop", "ip_both_drop", "ip_cache_features"):
            i[name] = widget(name)
    with FormRow():
        for name in ("ip_resampler_dim", "ip_resampler_depth"):
            i[name] = widget(name)
        i["ip_data_root"] = widget("ip_data_root", max_lines=1)


MAIN: dict[str, Callable[[dict[str, Any]], None]] = {"lora": lora_main, "t2i_adapter": t2i_main,
                                                     "ip_adapter": ip_main}
ADVANCED: dict[str, Callable[[dict[str, Any]], None]] = {"lora": lora_advanced, "t2i_adapter": t2i_advanced,
                                                         "ip_adapter": ip_advanced}

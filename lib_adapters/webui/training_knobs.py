"""The "Train Adapter" tab's per-method knobs (Gradio 3.41): LoRA, T2I-Adapter and IP-Adapter groups, each
split into the main knobs and the rarely changed ones shown in the Advanced accordion, and the lists their
dropdowns offer.

The lists come from the Adapters panel's own places (``settings.current()``): adapter files as its
``ModelCatalog`` names them (models/adapters, adapter files of models/ControlNet), kept to the method's
family, so a name picked here is resolved by the job manager exactly as the panel resolves it; CLIP vision
files of its encoder folders; the preprocessors of its table. The dropdowns also take a typed path.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from modules.ui_components import FormRow, ToolButton

from ..catalog import ModelCatalog
from ..formats.detect import ModelFamily, detect_family
from ..formats.reader import MODEL_SUFFIXES, PICKLE_SUFFIXES, read_safetensors_keys
from ..preprocess.registry import list_preprocessors
from .panel import settings
from .training_view import AUTO_ENCODER, SCRATCH

log = logging.getLogger("adapters")

ELEM_PREFIX = "adapters_train"
_IP_NAME_HINTS = ("ip-adapter", "ip_adapter", "ipadapter")


def eid(name: str) -> str:
    return f"{ELEM_PREFIX}_{name}"


# lists -----------------------------------------------------------------------------------------------------------


def _family_of(path: Path) -> str:
    """"t2i", "ip" or "" for an adapter file. A pickle's keys cannot be read without loading it: its name decides."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "ip" if any(h in path.name.lower() for h in _IP_NAME_HINTS) else "t2i"
    try:
        family = detect_family({k: None for k in read_safetensors_keys(path)})[0]
    except Exception:  # noqa: BLE001  (an unreadable file is simply not offered; the panel reports it on load)
        return ""
    return "t2i" if family.is_t2i else "ip" if family is ModelFamily.IP_ADAPTER else ""


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


# groups ------------------------------------------------------------------------------------------------------------


def _file_dropdown(label: str, choices: list[str], name: str) -> Any:
    # allow_custom_value: a path typed in is sent as it is (TrainRequest takes a listed name or a path)
    return gr.Dropdown(label=label, choices=choices, value=choices[0], allow_custom_value=True, elem_id=eid(name))


def lora_main(i: dict[str, Any]) -> None:
    with FormRow():
        i["rank"] = gr.Slider(label="LoRA rank", minimum=1, maximum=256, step=1, value=16, elem_id=eid("rank"))
        i["alpha"] = gr.Slider(label="LoRA alpha", minimum=1, maximum=256, step=1, value=16, elem_id=eid("alpha"))


def lora_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        i["lora_targets"] = gr.Dropdown(
            label="LoRA layers", choices=["attention", "attention+ff", "attention+ff+conv"], value="attention",
            elem_id=eid("lora_targets"))
        i["train_text_encoder"] = gr.Checkbox(label="Train the text encoder too", value=False,
                                              elem_id=eid("train_text_encoder"))


def t2i_main(i: dict[str, Any]) -> None:
    with FormRow():
        i["t2i_condition"] = gr.Textbox(label="Condition name (x.<condition>.png)", value="depth", max_lines=1,
                                        elem_id=eid("t2i_condition"))
        i["t2i_condition_channels"] = gr.Dropdown(label="Condition channels (1: edges, sketches)", choices=["3", "1"],
                                                  value="3", elem_id=eid("t2i_condition_channels"))
        i["t2i_adapter_kind"] = gr.Dropdown(label="Adapter", choices=["full", "light"], value="full",
                                            elem_id=eid("t2i_adapter_kind"))
    with FormRow():
        i["t2i_init_from"] = _file_dropdown("Start from (an adapter to fine-tune)", adapter_choices("t2i_adapter"),
                                            "t2i_init_from")
        refresh = ToolButton("\U0001F504", elem_id=eid("t2i_refresh"))
        i["t2i_preprocessor"] = gr.Dropdown(label="Preprocessor for missing conditions", value="none",
                                            choices=preprocessor_choices(), elem_id=eid("t2i_preprocessor"))
    refresh.click(fn=lambda: gr.update(choices=adapter_choices("t2i_adapter")), outputs=[i["t2i_init_from"]],
                  show_progress="hidden")


def t2i_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        i["t2i_timesteps"] = gr.Dropdown(label="Timesteps (cubic: the SDXL recipe)", choices=["uniform", "cubic"],
                                         value="uniform", elem_id=eid("t2i_timesteps"))
        i["t2i_num_res_blocks"] = gr.Number(label="Blocks per level (0: as released, 2 full / 4 light)", value=0,
                                            precision=0, elem_id=eid("t2i_num_res_blocks"))
        i["t2i_export_layout"] = gr.Dropdown(label="File layout", choices=["tencentarc", "diffusers"],
                                             value="tencentarc", elem_id=eid("t2i_export_layout"))


def ip_main(i: dict[str, Any]) -> None:
    with FormRow():
        i["ip_projection"] = gr.Dropdown(label="Projection (plus: Resampler, 16 tokens)", choices=["plain", "plus"],
                                         value="plain", elem_id=eid("ip_projection"))
        i["ip_init_from"] = _file_dropdown("Start from (an IP-Adapter to fine-tune)", adapter_choices("ip_adapter"),
                                           "ip_init_from")
        i["ip_image_encoder"] = _file_dropdown("CLIP image encoder (Auto: as released)", encoder_choices(),
                                               "ip_image_encoder")
        refresh = ToolButton("\U0001F504", elem_id=eid("ip_refresh"))
    refresh.click(fn=lambda: (gr.update(choices=adapter_choices("ip_adapter")), gr.update(choices=encoder_choices())),
                  outputs=[i["ip_init_from"], i["ip_image_encoder"]], show_progress="hidden")


def ip_advanced(i: dict[str, Any]) -> None:
    with FormRow():
        # the reference's dropout: 5% of samples without the image, 5% without the text, 5% without both
        for part in ("image", "text", "both"):
            i[f"ip_{part}_drop"] = gr.Number(label=f"Drop rate: {part}", value=0.05, elem_id=eid(f"ip_{part}_drop"))
        i["ip_cache_features"] = gr.Checkbox(label="Cache CLIP image features", value=True,
                                             elem_id=eid("ip_cache_features"))
    with FormRow():
        i["ip_resampler_dim"] = gr.Number(label="Resampler width (plus; 0: auto)", value=0, precision=0,
                                          elem_id=eid("ip_resampler_dim"))
        i["ip_resampler_depth"] = gr.Number(label="Resampler depth (plus)", value=4, precision=0,
                                            elem_id=eid("ip_resampler_depth"))
        i["ip_data_root"] = gr.Textbox(label="Images of a JSON list (empty: the JSON file's folder)", max_lines=1,
                                       elem_id=eid("ip_data_root"))


MAIN: dict[str, Callable[[dict[str, Any]], None]] = {"lora": lora_main, "t2i_adapter": t2i_main,
                                                     "ip_adapter": ip_main}
ADVANCED: dict[str, Callable[[dict[str, Any]], None]] = {"lora": lora_advanced, "t2i_adapter": t2i_advanced,
                                                         "ip_adapter": ip_advanced}

"""The extension's Settings page, and a typed snapshot of it that the core receives as arguments."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...face import DEFAULT_PACK, FaceDevice
from ...inference.cache import DEFAULT_BUDGET_MB
from ...preprocess.resize import DEFAULT_MAX_MEGAPIXELS, MEGAPIXEL

SECTION = ("adapters", "Adapters")
FACE_DEVICE_AUTO, FACE_DEVICE_CPU = "Auto", "CPU"


@dataclass(frozen=True)
class PanelSettings:
    unit_count: int
    model_dirs: tuple[Path, ...]  # listed whole
    shared_model_dirs: tuple[Path, ...]  # only adapter files are listed from these
    annotator_dir: Path
    encoder_dirs: tuple[Path, ...]  # CLIP vision encoders for IP-Adapters
    cache_budget_mb: int  # memory for adapter models and encoders kept between generations
    max_image_pixels: int | None  # larger condition/reference/mask images are refused; None: no limit
    models_dir: Path = Path("models")  # the WebUI's models folder: face model packs in insightface/models/<pack>
    face_pack: str = DEFAULT_PACK  # for FaceID units that name none
    face_device: FaceDevice = FaceDevice.CPU
    lora_dirs: tuple[Path, ...] = ()  # the WebUI's Lora folders (FaceID models' paired LoRAs)


def register() -> None:
    """Add the options at import time, as the WebUI's built-in Lora extension does: ``on_ui_settings``
    only fires when the UI is built, so with ``--nowebui`` the API would not know the keys."""
    import gradio as gr
    from modules import shared

    shared.options_templates.update(shared.options_section(SECTION, {
        "adapters_unit_count": shared.OptionInfo(
            3, "Number of adapter units", gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}).needs_reload_ui(),
        "adapters_extra_model_dirs": shared.OptionInfo(
            "", "Extra folders with adapter models (one per line)", gr.Textbox, {"lines": 2},
        ).info("models/adapters is always searched; adapter files in models/ControlNet are listed too"),
        "adapters_annotator_dir": shared.OptionInfo(
            "", "Folder with preprocessor weights").info("empty: models/adapters/annotators"),
        # replaces "adapters_cache_size" (a count of models), which a config.json may still hold: it is ignored
        "adapters_cache_budget_mb": shared.OptionInfo(
            DEFAULT_BUDGET_MB, "Memory for adapter models kept between generations (MB)", gr.Slider,
            {"minimum": 0, "maximum": 65536, "step": 256},
        ).info("the models and CLIP encoders the units use stay loaded up to this size, least recently used out "
               "first; the default fits three units and their encoders, SDXL's ViT-bigG/14 included"),
        "adapters_max_image_megapixels": shared.OptionInfo(
            # at most 160: Pillow itself refuses images above 179 million pixels (its bomb limit, x2)
            DEFAULT_MAX_MEGAPIXELS, "Largest condition, reference or mask image (megapixels)", gr.Slider,
            {"minimum": 0, "maximum": 160, "step": 1},
        ).info("1 megapixel = 1024 x 1024 pixels, so 16 allows 4096 x 4096; larger images are refused before "
               "they are decoded (a small PNG can hold a huge image); 0: no limit"),
        "adapters_face_pack": shared.OptionInfo(
            DEFAULT_PACK, "Face models for IP-Adapter FaceID (insightface pack folder)",
        ).info("a folder in models/insightface/models: buffalo_l or antelopev2, as insightface releases them "
               "(non-commercial research use only); a unit may name another"),
        "adapters_face_device": shared.OptionInfo(
            FACE_DEVICE_AUTO, "Face analysis runs on", gr.Radio, {"choices": [FACE_DEVICE_AUTO, FACE_DEVICE_CPU]},
        ).info("Auto: the GPU when the WebUI runs on CUDA and onnxruntime-gpu is installed, else the CPU"),
    }))


def current() -> PanelSettings:
    from modules import devices, paths, shared

    models = Path(paths.models_path)
    extra = tuple(Path(line.strip()) for line in str(getattr(shared.opts, "adapters_extra_model_dirs", "") or "")
                  .splitlines() if line.strip())
    annotators = str(getattr(shared.opts, "adapters_annotator_dir", "") or "").strip()
    return PanelSettings(
        unit_count=int(getattr(shared.opts, "adapters_unit_count", 3) or 3),
        model_dirs=(models / "adapters",) + extra,
        shared_model_dirs=(models / "ControlNet",),
        annotator_dir=Path(annotators) if annotators else models / "adapters" / "annotators",
        encoder_dirs=(models / "clip_vision", models / "adapters" / "clip_vision"),
        cache_budget_mb=_budget_mb(getattr(shared.opts, "adapters_cache_budget_mb", DEFAULT_BUDGET_MB)),
        max_image_pixels=_max_pixels(getattr(shared.opts, "adapters_max_image_megapixels", DEFAULT_MAX_MEGAPIXELS)),
        models_dir=models,
        face_pack=str(getattr(shared.opts, "adapters_face_pack", DEFAULT_PACK) or DEFAULT_PACK).strip() or DEFAULT_PACK,
        face_device=_face_device(getattr(shared.opts, "adapters_face_device", FACE_DEVICE_AUTO),
                                 getattr(devices, "device", None)),
        lora_dirs=tuple(Path(d) for d in (getattr(shared.cmd_opts, "lora_dir", None) or models / "Lora",
                                          getattr(shared.cmd_opts, "lyco_dir_backcompat", None)) if d),
    )


def _face_device(choice: object, webui_device: object) -> FaceDevice:
    """CUDA when asked for (Auto) and the WebUI runs on CUDA; onnxruntime falls back to the CPU without its GPU
    package (``face/runtime.providers_for``)."""
    on_cuda = getattr(webui_device, "type", str(webui_device)) == "cuda"
    return FaceDevice.CUDA if choice != FACE_DEVICE_CPU and on_cuda else FaceDevice.CPU


def _budget_mb(value: object) -> int:
    """The budget in MB; an unreadable or negative value falls back to the default (a hand-edited config)."""
    try:
        budget = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_BUDGET_MB
    return budget if budget >= 0 else DEFAULT_BUDGET_MB


def _max_pixels(megapixels: object) -> int | None:
    """The image size limit in pixels (None: no limit); an unreadable value falls back to the default."""
    try:
        value = float(megapixels)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = DEFAULT_MAX_MEGAPIXELS
    if value != value or value < 0:  # NaN or negative from a hand-edited config
        value = DEFAULT_MAX_MEGAPIXELS
    return None if value == 0 or value == float("inf") else int(value * MEGAPIXEL)

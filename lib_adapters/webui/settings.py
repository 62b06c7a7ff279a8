"""The extension's Settings page, and a typed snapshot of it that the core receives as arguments."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SECTION = ("adapters", "Adapters")


@dataclass(frozen=True)
class PanelSettings:
    unit_count: int
    model_dirs: tuple[Path, ...]  # listed whole
    shared_model_dirs: tuple[Path, ...]  # only adapter files are listed from these
    annotator_dir: Path
    encoder_dirs: tuple[Path, ...]  # CLIP vision encoders for IP-Adapters
    cache_size: int


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
        "adapters_cache_size": shared.OptionInfo(
            2, "Adapter models kept in memory", gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}),
    }))


def current() -> PanelSettings:
    from modules import paths, shared

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
        cache_size=int(getattr(shared.opts, "adapters_cache_size", 2) or 2),
    )

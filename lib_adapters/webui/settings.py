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
    """``on_ui_settings`` callback."""
    import gradio as gr
    from modules import shared

    def add(key: str, info) -> None:
        shared.opts.add_option(key, info)

    add("adapters_unit_count", shared.OptionInfo(
        3, "Number of adapter units", gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}, section=SECTION,
    ).needs_reload_ui())
    add("adapters_extra_model_dirs", shared.OptionInfo(
        "", "Extra folders with adapter models (one per line)", gr.Textbox, {"lines": 2}, section=SECTION,
    ).info("models/adapters is always searched; adapter files in models/ControlNet are listed too"))
    add("adapters_annotator_dir", shared.OptionInfo(
        "", "Folder with preprocessor weights", section=SECTION,
    ).info("empty: models/adapters/annotators"))
    add("adapters_cache_size", shared.OptionInfo(
        2, "Adapter models kept in memory", gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}, section=SECTION,
    ))


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

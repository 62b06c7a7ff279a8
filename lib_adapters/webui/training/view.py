"""What the "Train Adapter" tab shows, as plain data: the request built from the widgets' values and
the rendering of a ``JobStatus`` (progress line, loss curve, samples, log, result message).

No gradio here, so the handlers' logic is testable on its own; ``tab.py`` turns a
``StatusView`` into gradio updates.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ...errors import InputError
from ...training.progress import format_duration
from ...training.request import FIELDS, Kind, TrainRequest, method_fields, shared_fields
from .jobs import JobState, JobStatus

# The knobs every method shares that the tab has a widget for, in the order the tab passes them to its handlers
# (the schema's order). Each method adds its own (``MethodInfo.fields``); only the selected method's knobs go into
# the request, so a hidden group of another method never sends fields that method does not take. Fields the tab
# shows no widget for (``Knob.tab``) keep their defaults.
COMMON_FIELDS: tuple[str, ...] = tuple(n for n in shared_fields() if n != "method" and FIELDS[n].tab)

SCRATCH = "None (from scratch)"  # the init-from dropdowns' first choice: sent as ""
AUTO_ENCODER = "Auto"  # the image-encoder dropdown's first choice: sent as ""
_ADAPTER_USE = "select <code>{name}</code> as the model of an Adapters unit in txt2img or img2img"


@dataclass(frozen=True)
class MethodInfo:
    """One trainable method as the tab offers it."""

    key: str  # TrainRequest.method
    label: str  # shown in the dropdown
    usage: str  # how to use the result; {name} is the output file's stem
    dataset_label: str
    dataset_hint: str  # the dataset box's placeholder: the layouts the method reads
    # Shared knobs whose usual value differs by method: selecting the method sets them.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sample_input: str = ""  # the label of the samples' image box (adapters: condition or reference); "": none

    @property
    def fields(self) -> tuple[str, ...]:
        """Method-specific TrainRequest fields that have a widget (in the method's groups)."""
        return tuple(n for n in method_fields(self.key) if FIELDS[n].tab)


METHODS: tuple[MethodInfo, ...] = (
    MethodInfo("lora", "LoRA", "use <code>&lt;lora:{name}:1&gt;</code> in your prompt", "Dataset folder",
               "Folder of images with .txt/.caption files (kohya N_name folders repeat N times)",
               {"learning_rate": 1e-4, "sample_every": 250}),
    # 1e-5: the TencentARC recipe (SD1 and SDXL, constant).
    MethodInfo("t2i_adapter", "T2I-Adapter", _ADAPTER_USE + " with a condition image", "Dataset folder or meta .txt",
               "Folder with x.png + x.<condition>.png + x.txt per sample, or a TencentARC meta .txt "
               "(one image path per line)", {"learning_rate": 1e-5, "sample_every": 250},
               "Sample condition image (as is; empty: the dataset's first)"),
    # 1e-4: tencent-ailab's tutorial_train.py.
    MethodInfo("ip_adapter", "IP-Adapter", _ADAPTER_USE + " with a reference image", "Dataset folder or JSON list",
               'Folder of images with .txt/.caption files, or the reference\'s JSON list '
               '[{"image_file": "1.png", "text": "a dog"}, ...]', {"learning_rate": 1e-4, "sample_every": 250},
               "Sample reference image (empty: the dataset's first)"),
)
DEFAULTED_FIELDS: tuple[str, ...] = tuple(sorted({name for info in METHODS for name in info.defaults}))

# Dropdown choices that stand for "" in the request (a dropdown cannot offer an empty string).
EMPTY_CHOICES = {"t2i_init_from": SCRATCH, "ip_init_from": SCRATCH, "ip_image_encoder": AUTO_ENCODER,
                 "t2i_preprocessor": "none"}
LOSS_PLOT_POINTS = 300  # longer curves are averaged into this many points: the plot stays light to send
SMOOTHING = 0.9  # EMA factor of the "smoothed" curve


def method_info(key_or_label: str) -> MethodInfo:
    for info in METHODS:
        if key_or_label in (info.key, info.label):
            return info
    raise InputError(f"unknown training method {key_or_label!r}; choose one of {', '.join(m.label for m in METHODS)}")


def all_fields() -> tuple[str, ...]:
    """Every field the tab has a widget for: common ones, then each method's, in METHODS order."""
    return COMMON_FIELDS + tuple(name for info in METHODS for name in info.fields)


# request ---------------------------------------------------------------------------------------------------


def _number(name: str, value: Any, kind: type) -> Any:
    """Widget numbers arrive as float (sliders, numbers) or str; the config wants exact ints/floats."""
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name.replace('_', ' ')} must be a number; got {value!r}") from None
    if kind is int:
        if not math.isfinite(number) or number != round(number):
            raise InputError(f"{name.replace('_', ' ')} must be a whole number; got {value!r}")
        return int(round(number))
    return number


def _clean(name: str, value: Any) -> Any:
    """A widget's value as the request field's JSON kind takes it."""
    kind = FIELDS[name].kind
    if kind in (Kind.INT, Kind.FLOAT):
        return _number(name, value, int if kind is Kind.INT else float)
    if kind in (Kind.OPT_INT, Kind.OPT_FLOAT):  # 0 or empty: null, the field's "none" (off, auto, as released)
        number = _number(name, value or 0, int if kind is Kind.OPT_INT else float)
        return number if number != 0 else None
    if kind is Kind.STRS:
        text = value if isinstance(value, str) else "\n".join(value or ())
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    if kind in (Kind.STR, Kind.OPT_STR):  # a cleared textbox or dropdown gives None
        text = (value or "").strip()
        return "" if text == EMPTY_CHOICES.get(name) else text
    return value


def build_request(method: str, values: Mapping[str, Any]) -> tuple[TrainRequest, list[str]]:
    """The request for ``method`` (key or label) from the widgets' ``values`` by field name, and notes
    on adjustments made (shown to the user). ``InputError`` names the first bad value."""
    info = method_info(method)
    data: dict[str, Any] = {"method": info.key}
    for name in COMMON_FIELDS + info.fields:
        data[name] = _clean(name, values[name])
    if not info.sample_input:  # the box is hidden for methods whose samples take no image
        data.pop("sample_image")
    notes = []
    if not data["dataset_dir"]:
        raise InputError(f"choose a dataset ({info.dataset_label.lower()}): {info.dataset_hint}")
    if not data["output_name"]:
        raise InputError("choose an output name: the file name (without extension) the result is saved as")
    if data["sample_every"] > 0 and not data["sample_prompts"]:
        # Samples need a prompt; an empty prompt box means "no samples" rather than a refused run.
        data["sample_every"] = 0
        notes.append("No sample prompt given: sample images are off.")
    return TrainRequest.from_dict(data), notes


# status ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusView:
    """Everything the tab's outputs show for one status; equal fields need not be sent again."""

    progress: str  # HTML: step, loss, speed, ETA
    loss_points: tuple[tuple[int, float, str], ...]  # (step, loss, series) for the plot
    samples: tuple[str, ...]  # newest first
    log: str
    result: str  # HTML
    running: bool
    resumable: bool


def smoothed(losses: list[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it), skipping non-finite values."""
    out, avg, weight = [], 0.0, 0.0
    for loss in losses:
        if math.isfinite(loss):
            avg = factor * avg + (1 - factor) * loss
            weight = factor * weight + (1 - factor)
        out.append(avg / weight if weight else float("nan"))
    return out


def loss_points(losses: list[float], max_points: int = LOSS_PLOT_POINTS,
                first_step: int = 1) -> tuple[tuple[int, float, str], ...]:
    """Raw and smoothed loss by step (``first_step``: the first loss's, after a resume the step it resumed at + 1);
    long runs averaged into ``max_points``."""
    if not losses:
        return ()
    stride = max(1, math.ceil(len(losses) / max_points))
    points: list[tuple[int, float, str]] = []
    for series, values in (("loss", losses), ("smoothed", smoothed(losses))):
        for start in range(0, len(values), stride):
            chunk = [v for v in values[start:start + stride] if math.isfinite(v)]
            if chunk:
                points.append((first_step - 1 + min(start + stride, len(values)), sum(chunk) / len(chunk), series))
    return tuple(points)


def _progress_line(status: JobStatus) -> str:
    if status.state is JobState.IDLE:
        return "No training run yet."
    parts = [f"<b>{html.escape(status.state.value.capitalize())}</b>",
             f"step {status.step} / {status.total}"]
    if status.losses:
        recent = [v for v in status.losses[-20:] if math.isfinite(v)]
        parts.append(f"loss {status.losses[-1]:.4f}" + (f" (avg {sum(recent) / len(recent):.4f})" if recent else ""))
    if status.lr is not None:
        parts.append(f"lr {status.lr:.2e}")
    per_step = _seconds_per_step(status)
    if per_step is not None:
        parts.append(f"{per_step:.2f} s/step")
    parts.append(f"elapsed {format_duration(status.elapsed)}")
    if status.state is JobState.RUNNING:
        parts.append(f"ETA {format_duration(status.eta)}")
    return " · ".join(parts)


def _seconds_per_step(status: JobStatus) -> float | None:
    """The loop's own rate (without start-up time, right after a resume) from the job's ETA, while running."""
    if status.state is JobState.RUNNING and status.eta is not None and status.total > status.step > 0:
        return status.eta / (status.total - status.step)
    return None


def _code(path: str) -> str:
    return f"<code>{html.escape(path)}</code>"


def result_message(status: JobStatus) -> str:
    """The outcome in words: the file, how to use it, or what went wrong and what to do."""
    usage = ""
    if status.output:
        name = Path(status.output).stem
        try:
            usage = method_info(status.method or "").usage.format(name=html.escape(name))
        except InputError:
            usage = ""
    if status.state is JobState.FINISHED:
        saved = f"Saved {_code(status.output)}" if status.output else "Finished"
        return f"<p>{saved}; {usage}.</p>" if usage else f"<p>{saved}.</p>"
    if status.state is JobState.INTERRUPTED:
        lines = [f"Interrupted at step {status.step} / {status.total}."]
        if status.output:
            lines.append(f"Saved {_code(status.output)}" + (f"; {usage}." if usage else "."))
        if status.checkpoint:
            lines.append(f"Checkpoint {_code(status.checkpoint)}: press Resume to continue.")
        return "<p>" + "<br>".join(lines) + "</p>"
    if status.state is JobState.FAILED:
        text = f"<div class='error'>{html.escape(status.error or 'training failed')}</div>"
        if status.checkpoint:
            text += f"<p>Last good checkpoint {_code(status.checkpoint)}.</p>"
        return text
    return ""


def render_status(status: JobStatus) -> StatusView:
    running = status.state is JobState.RUNNING
    return StatusView(
        progress=_progress_line(status),
        # the status holds this session's losses: a resumed run's first is the step after the one it resumed at
        loss_points=loss_points(list(status.losses), first_step=status.step - len(status.losses) + 1),
        samples=tuple(reversed(status.samples)),
        log="\n".join(status.log),
        result=result_message(status),
        running=running,
        # a finished run has nothing left to resume; an interrupted or failed one continues from its checkpoint
        resumable=status.state in (JobState.INTERRUPTED, JobState.FAILED) and bool(status.checkpoint),
    )


def error_html(message: str) -> str:
    return f"<div class='error'>{html.escape(message)}</div>"

"""The "Train Adapter" tab: the Gradio 3.41 layout and its handlers over ``TrainingJobs``.

Layout follows the WebUI's own Train tab: settings on the left (method, dataset, output name, the
main knobs, the advanced ones in a closed accordion, then Train / Interrupt / Resume), outputs on
the right (progress line, loss plot, sample gallery, log, result). Each method's knobs sit in their
own groups (knobs.py: main ones, and rarely changed ones inside Advanced), shown only while
that method is selected; selecting a method also sets its dataset hint and its usual learning rate and
sample interval (view.METHODS).

Progress: the Train and Resume buttons run ``adapters_train_start`` (javascript/adapters_train.js)
first, which makes a ``task(...)`` id and, inside the WebUI, starts its progress bar on that id; the
job manager registers the id with ``modules.progress``. The handlers are generators that poll the
job's status and yield only what changed, so the tab follows a run with the queue enabled; the
page's load event and the refresh button re-attach to a run after a page reload. The run itself
lives in the job manager's thread, never in a gradio worker.
"""
from __future__ import annotations

import html
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterator

import gradio as gr

from modules.ui_components import FormRow, ToolButton

from ...errors import AdapterError
from ..gradio_compat import js, plot_only_3
from .jobs import TrainingJobs
from .knobs import ADVANCED, ELEM_PREFIX, MAIN, eid, widget
from .view import (
    DEFAULTED_FIELDS, METHODS, StatusView, all_fields, build_request, error_html, method_info, render_status,
)

log = logging.getLogger("adapters")

TITLE = "Train Adapter"
START_JS = "adapters_train_start"  # javascript/adapters_train.js
__all__ = ["ELEM_PREFIX", "TITLE", "TrainTab", "eid"]


class TrainTab:
    """The tab's widgets and handlers. ``jobs`` returns the process's job manager (created lazily by
    the caller); ``poll_seconds`` is how often a following handler reads the status."""

    def __init__(self, jobs: Callable[[], TrainingJobs], poll_seconds: float = 1.0) -> None:
        self._jobs = jobs
        self.poll_seconds = poll_seconds
        self.inputs: dict[str, Any] = {}
        self.method_groups: dict[str, list[Any]] = {}
        self.outputs: list[Any] = []

    # layout ------------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False) as blocks:
            with gr.Row(equal_height=False):
                with gr.Column(variant="compact", elem_id=eid("settings")):
                    self._settings()
                    buttons = self._buttons()
                with gr.Column(elem_id=eid("output_column")):
                    self._outputs()
            self._wire(*buttons)
            # A page opened (or reloaded) while a run goes on shows and follows it.
            blocks.load(fn=self.follow, outputs=self.outputs, show_progress="hidden")
        return blocks

    def _settings(self) -> None:
        i, first = self.inputs, METHODS[0]
        with FormRow():
            i["method"] = gr.Dropdown(label="Method", choices=[m.label for m in METHODS], value=first.label,
                                      elem_id=eid("method"))
            i["output_name"] = widget("output_name", placeholder="my_style")
        # off: a run whose name is taken by another run's file is refused, the file left as it is
        i["overwrite"] = widget("overwrite")
        i["dataset_dir"] = widget("dataset_dir", label=first.dataset_label, placeholder=first.dataset_hint)
        for info in METHODS:
            self._method_group(info.key, MAIN[info.key])
        with FormRow():
            i["resolution"] = widget("resolution", gr.Slider, minimum=64, maximum=2048, step=64)
            i["steps"] = widget("steps")
        with FormRow():
            for name in ("batch_size", "grad_accumulation", "learning_rate", "precision"):
                i[name] = widget(name, **({"value": first.defaults[name]} if name in first.defaults else {}))
        with FormRow():
            for name in ("save_every", "sample_every"):
                i[name] = widget(name, **({"value": first.defaults[name]} if name in first.defaults else {}))
        i["sample_prompts"] = widget("sample_prompts", placeholder="One prompt per line")
        # shown for the adapters, whose samples need their input: a condition or a reference image
        i["sample_image"] = widget("sample_image", label=first.sample_input or "Sample image",
                                   placeholder="Path of an image", visible=bool(first.sample_input))
        with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
            self._advanced()
            for info in METHODS:
                self._method_group(info.key, ADVANCED[info.key])

    def _advanced(self) -> None:
        rows = (("lr_schedule", "warmup_steps", "optimizer", "seed"),
                ("min_snr_gamma", "noise_offset", "sample_steps", "save_precision"),
                ("gradient_checkpointing", "cache_latents", "buckets"))
        for row in rows:
            with FormRow():
                for name in row:
                    self.inputs[name] = widget(name)

    def _method_group(self, key: str, build: Callable[[dict[str, Any]], None]) -> None:
        visible = key == METHODS[0].key
        with gr.Group(visible=visible, elem_id=eid(f"{key}_group{len(self.method_groups.get(key, []))}")) as group:
            build(self.inputs)
        self.method_groups.setdefault(key, []).append(group)

    def _buttons(self) -> tuple[Any, ...]:
        with gr.Row(elem_id=eid("buttons")):
            train = gr.Button("Train", variant="primary", elem_id=eid("start"))
            interrupt = gr.Button("Interrupt", elem_id=eid("interrupt"))
            resume = gr.Button("Resume", elem_id=eid("resume"))
            follow = ToolButton("\U0001F504", elem_id=eid("refresh"))  # title set in javascript/adapters_train.js
        return train, interrupt, resume, follow

    def _outputs(self) -> None:
        progress = gr.HTML(value="No training run yet.", elem_id=eid("progress"))
        plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", x_title="step", y_title="loss",
                           height=240, **plot_only_3(width=480, tooltip=["step", "loss"]), elem_id=eid("loss_plot"),
                           show_label=False)
        # hidden until there are samples
        gallery = gr.Gallery(label="Samples", show_label=False, columns=4, visible=False, elem_id=eid("gallery"))
        log_box = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, show_copy_button=True,
                             elem_id=eid("log"))
        result = gr.HTML(value="", elem_id=eid("result"))
        self.outputs = [progress, plot, gallery, log_box, result]

    def _wire(self, train: Any, interrupt: Any, resume: Any, follow: Any) -> None:
        self.outputs += [train, interrupt, resume]
        id_task = gr.Textbox(visible=False, elem_id=eid("id_task"))  # the JS puts the task id here
        inputs = [id_task, self.inputs["method"]] + [self.inputs[name] for name in all_fields()]
        common = dict(outputs=self.outputs, show_progress="hidden")
        train.click(fn=self.start, inputs=inputs, **js(START_JS), **common)
        resume.click(fn=self.resume, inputs=inputs, **js(START_JS), **common)
        interrupt.click(fn=self.interrupt, inputs=[], **common)
        follow.click(fn=self.follow, inputs=[], **common)
        self.inputs["method"].change(fn=self.method_changed, inputs=[self.inputs["method"]],
                                     outputs=self.method_outputs(), show_progress="hidden")

    # handlers ----------------------------------------------------------------------------------------------
    def method_outputs(self) -> list[Any]:
        """What selecting a method changes: every method group, the dataset and sample-image boxes, the knobs of
        DEFAULTED_FIELDS."""
        groups = [g for key in sorted(self.method_groups) for g in self.method_groups[key]]
        return (groups + [self.inputs["dataset_dir"], self.inputs["sample_image"]]
                + [self.inputs[name] for name in DEFAULTED_FIELDS])

    def method_changed(self, method: str) -> list[dict]:
        """Show ``method``'s groups only, its dataset hint, its sample-image box (adapters), and its usual values
        of the shared knobs it sets."""
        info = method_info(method)
        groups = [gr.update(visible=k == info.key) for k in sorted(self.method_groups) for _ in self.method_groups[k]]
        dataset = gr.update(label=info.dataset_label, placeholder=info.dataset_hint)
        sample_image = (gr.update(visible=True, label=info.sample_input) if info.sample_input
                        else gr.update(visible=False))
        defaults = [gr.update(value=info.defaults[n]) if n in info.defaults else gr.update() for n in DEFAULTED_FIELDS]
        return groups + [dataset, sample_image] + defaults

    def start(self, id_task: str, method: str, *values: Any) -> Iterator[tuple]:
        yield from self._start(id_task, method, values, resume=False)

    def resume(self, id_task: str, method: str, *values: Any) -> Iterator[tuple]:
        yield from self._start(id_task, method, values, resume=True)

    def interrupt(self) -> Iterator[tuple]:
        try:
            self._jobs().interrupt()
        except AdapterError as exc:
            yield self._error(str(exc))
            return
        yield from self.follow()

    def follow(self, notes: tuple[str, ...] = ()) -> Iterator[tuple]:
        """Yield the status until the run is no longer running (at once when none runs)."""
        previous: StatusView | None = None
        while True:
            view = self._view(notes)
            yield self.updates(view, previous)
            if not view.running:
                return
            previous = view
            time.sleep(self.poll_seconds)

    def _start(self, id_task: str, method: str, values: tuple, *, resume: bool) -> Iterator[tuple]:
        id_task = id_task if isinstance(id_task, str) and id_task.startswith("task(") else None
        try:
            request, notes = build_request(method, dict(zip(all_fields(), values)))
            self._jobs().start(request, resume=resume, id_task=id_task)
        except AdapterError as exc:
            _release_task(id_task)
            yield self._error(str(exc))
            return
        except Exception as exc:  # a bug must not take the tab down: show it, keep the traceback in the log
            log.exception("Train Adapter: could not start the run")
            _release_task(id_task)
            yield self._error(f"{type(exc).__name__}: {exc}")
            return
        yield from self.follow(tuple(notes))

    def _view(self, notes: tuple[str, ...] = ()) -> StatusView:
        view = render_status(self._jobs().status())
        if notes:
            view = replace(view, result="".join(f"<p>{html.escape(n)}</p>" for n in notes) + view.result)
        return view

    def _error(self, message: str) -> tuple:
        """Current status with ``message`` as the result: the run that is going on (if any) stays shown."""
        try:
            view = render_status(self._jobs().status())
        except Exception:  # the error may come from building the job manager itself
            log.exception("Train Adapter: no job status")
            view = StatusView("", (), (), "", "", False, False)
        return self.updates(replace(view, result=error_html(message)), None)

    # rendering ---------------------------------------------------------------------------------------------
    @staticmethod
    def updates(view: StatusView, previous: StatusView | None) -> tuple:
        """Gradio updates for the outputs; fields equal to ``previous`` are left as they are."""
        def changed(field: str) -> bool:
            return previous is None or getattr(previous, field) != getattr(view, field)

        def value(field: str, make: Callable[[], Any]) -> dict:
            return gr.update(value=make()) if changed(field) else gr.update()

        return (
            value("progress", lambda: view.progress),
            value("loss_points", lambda: loss_frame(view)),
            gr.update(value=list(view.samples), visible=bool(view.samples)) if changed("samples") else gr.update(),
            value("log", lambda: view.log),
            value("result", lambda: view.result),
            gr.update(interactive=not view.running),
            gr.update(interactive=view.running),
            gr.update(interactive=view.resumable),
        )


def loss_frame(view: StatusView) -> Any:
    """The LinePlot value: a DataFrame (pandas ships with gradio), or None to clear the plot."""
    if not view.loss_points:
        return None
    import pandas as pd
    return pd.DataFrame(list(view.loss_points), columns=["step", "loss", "series"])


def _release_task(id_task: str | None) -> None:
    """A run that did not start must not leave the WebUI's progress bar waiting for it."""
    if id_task:
        from modules import progress
        progress.finish_task(id_task)

"""The "Train Adapter" tab's handlers without a browser: the request built from the widgets' values for
each method (LoRA, T2I-Adapter, IP-Adapter), the method switch, the file lists, a status rendered to the
outputs, the Train/Resume/Interrupt/follow handlers over a scripted job manager, a short T2I run through
the real job manager, and the WebUI entry point (scripts/adapters_train.py)."""
from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pytest

from lib_adapters.errors import InputError
from lib_adapters.training.request import TrainRequest
from lib_adapters.webui.training.jobs import JobRunningError, JobState, JobStatus
from lib_adapters.training.request import method_fields
from lib_adapters.webui.training.tab import TrainTab
from lib_adapters.training.progress import format_duration
from lib_adapters.webui.training.view import (
    AUTO_ENCODER, SCRATCH, all_fields, build_request, loss_points, render_status, smoothed,
)


def _widget_defaults(tab: TrainTab) -> dict:
    return {name: tab.inputs[name].value for name in all_fields()}


@pytest.fixture(scope="module")
def built_tab():
    tab = TrainTab(lambda: None)
    tab.build()
    return tab


class ScriptedJobs:
    """A job manager whose status moves one step per ``status()`` call through ``statuses``."""

    def __init__(self, statuses=(), start_error: Exception | None = None):
        self.statuses = list(statuses) or [JobStatus()]
        self.start_error = start_error
        self.started: list[tuple[TrainRequest, bool, str | None]] = []
        self.interrupts = 0

    def start(self, request, *, resume=False, id_task=None):
        if self.start_error is not None:
            raise self.start_error
        self.started.append((request, resume, id_task))
        return self.statuses[0]

    def status(self):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def interrupt(self):
        self.interrupts += 1
        return self.statuses[0]


def _running(step, total=10, **kw):
    return JobStatus(state=JobState.RUNNING, job_id="j", method="lora", output_name="shapes", step=step, total=total,
                     losses=[0.5 - 0.01 * i for i in range(step)], lr=1e-4, elapsed=2.0 * step + 5,
                     eta=3.0 * (total - step), **kw)


# request -------------------------------------------------------------------------------------------------------


def test_request_from_the_widgets_default_values(built_tab):
    values = {**_widget_defaults(built_tab), "dataset_dir": "  /data/shapes ", "output_name": "shapes ",
              "sample_prompts": "a red circle\n\n  a blue square  \n", "steps": 300.0, "rank": 8.0, "alpha": 4.0,
              "min_snr_gamma": 5, "lr_schedule": "cosine", "train_text_encoder": True, "save_precision": "fp16",
              "sample_image": "/left/over/from/an/adapter.png"}  # the box is hidden for LoRA: not sent
    request, notes = build_request("LoRA", values)
    assert notes == []
    assert request == TrainRequest(
        dataset_dir="/data/shapes", output_name="shapes", method="lora", resolution=512, steps=300, batch_size=1,
        grad_accumulation=1, learning_rate=1e-4, lr_schedule="cosine", warmup_steps=0, optimizer="adamw",
        precision="auto", seed=0, save_every=500, sample_every=250, sample_prompts=("a red circle", "a blue square"),
        sample_steps=20, rank=8, alpha=4.0, lora_targets="attention", train_text_encoder=True, min_snr_gamma=5.0,
        noise_offset=0.0, gradient_checkpointing=False, cache_latents=False, buckets=True, save_precision="fp16")
    assert type(request.steps) is int and type(request.rank) is int and type(request.alpha) is float
    # the request is one the core accepts
    config = request.to_config("/tmp/out")
    assert config.lora.rank == 8 and config.lora.scale == 0.5 and config.min_snr_gamma == 5.0
    assert request.sample_image == "" and config.sample_image is None


def test_request_adjustments_and_refusals(built_tab):
    base = {**_widget_defaults(built_tab), "dataset_dir": "/d", "output_name": "o"}
    request, notes = build_request("lora", {**base, "sample_every": 100, "sample_prompts": "  \n"})
    assert request.sample_every == 0 and request.min_snr_gamma is None and notes == [
        "No sample prompt given: sample images are off."]
    with pytest.raises(InputError, match="dataset folder"):
        build_request("LoRA", {**base, "dataset_dir": "   "})
    with pytest.raises(InputError, match="output name"):
        build_request("LoRA", {**base, "output_name": ""})
    with pytest.raises(InputError, match="steps must be a whole number; got 10.5"):
        build_request("LoRA", {**base, "steps": 10.5})
    with pytest.raises(InputError, match="learning rate must be a number"):
        build_request("LoRA", {**base, "learning_rate": None})
    with pytest.raises(InputError, match="unknown training method 'DreamBooth'"):
        build_request("DreamBooth", base)


def test_the_overwrite_checkbox_is_off_and_goes_into_the_request(built_tab):
    box = built_tab.inputs["overwrite"]
    assert box.label == "Overwrite an existing file of this name" and box.value is False
    base = {**_widget_defaults(built_tab), "dataset_dir": "/d", "output_name": "o"}
    assert build_request("LoRA", base)[0].overwrite is False
    request, _ = build_request("T2I-Adapter", {**base, "overwrite": True})
    assert request.overwrite is True and TrainRequest.from_dict(request.to_dict()).overwrite is True


def _accepted(request: TrainRequest) -> TrainRequest:
    """The request as the job manager and the API take it: through JSON, then the core's config checks."""
    again = TrainRequest.from_dict(request.to_dict())
    assert again == request
    again.to_config("/tmp/out")
    return again


def test_t2i_request_from_the_widgets(built_tab):
    # LoRA's and IP's widgets changed too: only the T2I knobs go into a T2I request
    values = {**_widget_defaults(built_tab), "dataset_dir": "/data/depth", "output_name": "my_depth",
              "learning_rate": 1e-5, "sample_every": 0, "rank": 4.0, "ip_projection": "plus", "ip_image_drop": 0.2,
              "t2i_condition": " sketch ", "t2i_condition_channels": "1", "t2i_adapter_kind": "light",
              "t2i_preprocessor": "canny", "t2i_timesteps": "cubic", "t2i_num_res_blocks": 3.0,
              "t2i_export_layout": "diffusers", "t2i_init_from": "t2iadapter_sketch [0123abcd]",
              "sample_image": " /data/depth/probe.depth.png "}
    request, notes = build_request("T2I-Adapter", values)
    assert notes == []
    assert _accepted(request) == TrainRequest(
        dataset_dir="/data/depth", output_name="my_depth", method="t2i_adapter", learning_rate=1e-5, sample_every=0,
        sample_prompts=(), sample_image="/data/depth/probe.depth.png", t2i_adapter_kind="light", t2i_condition="sketch", t2i_condition_channels=1,
        t2i_num_res_blocks=3, t2i_preprocessor="canny", t2i_init_from="t2iadapter_sketch [0123abcd]",
        t2i_timesteps="cubic", t2i_export_layout="diffusers")
    # the widgets' own defaults: from scratch, no preprocessor (every condition must exist), blocks as released
    request, _ = build_request("t2i_adapter", {**_widget_defaults(built_tab), "dataset_dir": "/d", "output_name": "o"})
    t2i = {name: getattr(_accepted(request), name) for name in method_fields("t2i_adapter")}
    assert t2i == {name: TrainRequest.defaults()[name] for name in method_fields("t2i_adapter")}
    assert request.to_config("/tmp/out").t2i.init_from is None
    assert request.sample_image == "" and request.to_config("/tmp/out").sample_image is None
    probe = build_request("T2I-Adapter", values)[0].to_config("/tmp/out").sample_image
    assert probe == Path("/data/depth/probe.depth.png")
    with pytest.raises(InputError, match="meta .txt"):  # the method's own dataset hint
        build_request("T2I-Adapter", {**values, "dataset_dir": ""})
    with pytest.raises(InputError, match="condition name"):
        build_request("T2I-Adapter", {**values, "t2i_condition": "a/b"})[0].to_config("/tmp/out")


def test_ip_request_from_the_widgets(built_tab):
    values = {**_widget_defaults(built_tab), "dataset_dir": "/data/refs.json", "output_name": "my_ip", "rank": 4.0,
              "t2i_condition": "canny", "ip_projection": "plus", "ip_init_from": "/models/ip-adapter-plus_sd15.bin",
              "ip_image_encoder": AUTO_ENCODER, "ip_image_drop": 0.1, "ip_text_drop": 0, "ip_both_drop": "0.05",
              "ip_cache_features": False, "ip_resampler_dim": 0, "ip_resampler_depth": 2.0,
              "ip_data_root": " /data/images "}
    request, notes = build_request("IP-Adapter", values)
    assert notes == ["No sample prompt given: sample images are off."]
    assert _accepted(request) == TrainRequest(
        dataset_dir="/data/refs.json", output_name="my_ip", method="ip_adapter", sample_every=0,
        sample_prompts=(), ip_projection="plus", ip_image_encoder="", ip_init_from="/models/ip-adapter-plus_sd15.bin",
        ip_image_drop=0.1, ip_text_drop=0.0, ip_both_drop=0.05, ip_cache_features=False, ip_resampler_dim=None,
        ip_resampler_depth=2, ip_data_root="/data/images")
    request, _ = build_request("ip_adapter", {**values, "ip_init_from": SCRATCH,
                                              "ip_image_encoder": "vit-h.safetensors", "ip_resampler_dim": 768})
    assert (request.ip_init_from, request.ip_image_encoder, request.ip_resampler_dim) == ("", "vit-h.safetensors", 768)
    with pytest.raises(InputError, match="drop rates"):
        build_request("IP-Adapter", {**values, "ip_image_drop": 0.9, "ip_text_drop": 0.5}
                      )[0].to_config("/tmp/out")


def test_switching_the_method_shows_its_knobs_and_usual_values(built_tab):
    widgets = built_tab.method_outputs()
    assert set(built_tab.method_groups) == {"lora", "t2i_adapter", "ip_adapter"}
    sample_image_labels = {"t2i_adapter": "Sample condition image (as is; empty: the dataset's first)",
                           "ip_adapter": "Sample reference image (empty: the dataset's first)", "lora": None}
    for label, key, lr, sample_every in (("T2I-Adapter", "t2i_adapter", 1e-5, 250),
                                         ("IP-Adapter", "ip_adapter", 1e-4, 250), ("LoRA", "lora", 1e-4, 250)):
        update = dict(zip(map(id, widgets), built_tab.method_changed(label)))
        # the samples' image box: shown for the adapters (their samples need a condition or reference), not LoRA
        box = update[id(built_tab.inputs["sample_image"])]
        assert box["visible"] is (key != "lora") and box.get("label") == sample_image_labels[key]
        for group_key, groups in built_tab.method_groups.items():
            assert len(groups) == 2  # main knobs and the Advanced accordion's
            assert [update[id(g)]["visible"] for g in groups] == [group_key == key] * 2
        assert update[id(built_tab.inputs["learning_rate"])]["value"] == lr
        assert update[id(built_tab.inputs["sample_every"])]["value"] == sample_every
        dataset = update[id(built_tab.inputs["dataset_dir"])]
        assert dataset["label"] == {"lora": "Dataset folder", "t2i_adapter": "Dataset folder or meta .txt",
                                    "ip_adapter": "Dataset folder or JSON list"}[key]
    t2i_hint = dict(zip(map(id, widgets), built_tab.method_changed("T2I-Adapter")))[id(built_tab.inputs["dataset_dir"])]
    assert "x.<condition>.png" in t2i_hint["placeholder"] and "TencentARC meta .txt" in t2i_hint["placeholder"]
    # every method knob has a widget inside its own method's groups
    assert built_tab.inputs["t2i_init_from"].value == SCRATCH and built_tab.inputs["t2i_preprocessor"].value == "none"
    assert built_tab.inputs["ip_image_encoder"].value == AUTO_ENCODER


def test_adapter_result_says_where_to_select_it():
    done = JobStatus(state=JobState.FINISHED, method="t2i_adapter", step=10, total=10,
                     output="/w/models/adapters/my_depth.safetensors")
    assert render_status(done).result == (
        "<p>Saved <code>/w/models/adapters/my_depth.safetensors</code>; select <code>my_depth</code> as the model of "
        "an Adapters unit in txt2img or img2img with a condition image.</p>")
    stopped = JobStatus(state=JobState.INTERRUPTED, method="ip_adapter", step=3, total=10,
                        output="/w/models/adapters/my_ip.safetensors", checkpoint="/w/my_ip.state")
    assert ("select <code>my_ip</code> as the model of an Adapters unit in txt2img or img2img with a reference "
            "image.") in render_status(stopped).result
    assert "lora:" not in render_status(stopped).result


def test_file_lists_come_from_the_panels_folders(built_tab, tmp_path):
    import driver
    from fixtures.adapters import diffusers_adapter, save_both_layouts
    from safetensors.torch import save_file
    import torch

    from lib_adapters.webui.training.host import TrainingHost
    from lib_adapters.webui.training.knobs import adapter_choices, encoder_choices, preprocessor_choices

    driver.reset_webui(tmp_path)
    models = tmp_path / "models"
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=0), models / "adapters", "depth")
    save_file({"image_proj.proj.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
              str(models / "adapters" / "my_ip.safetensors"))
    (models / "clip_vision").mkdir(parents=True)
    (models / "clip_vision" / "vit-h.safetensors").write_bytes(b"")
    assert adapter_choices("t2i_adapter") == [SCRATCH, "depth", "depth_diffusers"]
    assert adapter_choices("ip_adapter") == [SCRATCH, "my_ip"]
    assert encoder_choices() == [AUTO_ENCODER, "vit-h.safetensors"]
    assert preprocessor_choices()[0] == "none" and "canny" in preprocessor_choices()
    # a listed name is resolved as the job manager resolves it: through the panel's catalog
    request, _ = build_request("T2I-Adapter", {**_widget_defaults(built_tab), "dataset_dir": "/d",
                                               "output_name": "o", "t2i_init_from": "depth_diffusers"})
    config = request.to_config("/tmp/out", places=TrainingHost().places("t2i_adapter"))
    assert config.t2i.init_from == models / "adapters" / "depth_diffusers.safetensors"


# status rendering ------------------------------------------------------------------------------------------------


def test_running_status_rendered():
    view = render_status(_running(4, samples=["/s/a.png", "/s/b.png"], log=["one", "two"]))
    assert view.progress == ("<b>Running</b> · step 4 / 10 · loss 0.4700 (avg 0.4850) · lr 1.00e-04 · 3.00 s/step"
                             " · elapsed 13s · ETA 18s")
    assert view.samples == ("/s/b.png", "/s/a.png")  # newest first
    assert view.log == "one\ntwo"
    assert view.result == "" and view.running and not view.resumable
    raw = [(s, v) for s, v, k in view.loss_points if k == "loss"]
    assert raw == [(1, 0.5), (2, 0.49), (3, 0.48), (4, 0.47)]
    smooth = [v for _, v, k in view.loss_points if k == "smoothed"]
    weights = [0.9 ** 3, 0.9 ** 2, 0.9, 1.0]  # bias-corrected EMA: a weighted mean of the losses so far
    expected = sum(w * v for w, (_, v) in zip(weights, raw)) / sum(weights)
    assert smooth[0] == pytest.approx(0.5) and smooth[-1] == pytest.approx(expected)
    assert expected == pytest.approx(0.48369, abs=1e-5)


def test_a_resumed_runs_loss_curve_is_drawn_at_its_own_steps():
    # The real WebUI 1.10.1 drew a run resumed at step 4 and finished at 6 at steps 1-2 while the progress line said
    # "step 6 / 6": the status holds this session's losses only, the steps before them are the resumed ones.
    resumed = JobStatus(state=JobState.FINISHED, method="ip_adapter", step=6, total=6, losses=[0.9982, 1.0037])
    raw = [(s, v) for s, v, k in render_status(resumed).loss_points if k == "loss"]
    assert raw == [(5, 0.9982), (6, 1.0037)]
    assert [s for s, _, k in render_status(_running(4)).loss_points if k == "loss"] == [1, 2, 3, 4]
    losses = [float(i % 10) for i in range(1000)]
    raw = [s for s, v, k in loss_points(losses, max_points=100, first_step=501) if k == "loss"]
    assert raw[0] == 510 and raw[-1] == 1500


def test_finished_interrupted_failed_messages():
    done = JobStatus(state=JobState.FINISHED, method="lora", step=10, total=10, elapsed=75,
                     output="/m/Lora/my<style>.safetensors", checkpoint="/w/c.state")
    view = render_status(done)
    assert view.result == ("<p>Saved <code>/m/Lora/my&lt;style&gt;.safetensors</code>; use "
                           "<code>&lt;lora:my&lt;style&gt;:1&gt;</code> in your prompt.</p>")
    assert view.progress.startswith("<b>Finished</b> · step 10 / 10") and "ETA" not in view.progress
    assert "elapsed 01:15" in view.progress and not view.running and not view.resumable

    stopped = render_status(JobStatus(state=JobState.INTERRUPTED, method="lora", step=3, total=10,
                                      output="/m/Lora/x.safetensors", checkpoint="/w/x-step000003.state"))
    assert stopped.result == ("<p>Interrupted at step 3 / 10.<br>Saved <code>/m/Lora/x.safetensors</code>; use "
                              "<code>&lt;lora:x:1&gt;</code> in your prompt.<br>Checkpoint "
                              "<code>/w/x-step000003.state</code>: press Resume to continue.</p>")

    failed = render_status(JobStatus(state=JobState.FAILED, method="lora", step=5, total=10, losses=[0.3, math.nan],
                                     error="loss is nan: try bf16 or a lower learning rate", checkpoint="/w/c.state"))
    assert failed.result == ("<div class='error'>loss is nan: try bf16 or a lower learning rate</div>"
                             "<p>Last good checkpoint <code>/w/c.state</code>.</p>")
    assert "loss nan (avg 0.3000)" in failed.progress
    assert render_status(JobStatus()).progress == "No training run yet."


def test_loss_curve_is_averaged_for_long_runs():
    losses = [float(i % 10) for i in range(1000)]
    points = loss_points(losses, max_points=100)
    raw = [(s, v) for s, v, k in points if k == "loss"]
    assert len(raw) == 100 and raw[0] == (10, 4.5) and raw[-1] == (1000, 4.5)
    assert smoothed([1.0, math.inf, 3.0], 0.5)[1] == 1.0  # non-finite values do not poison the curve
    assert [format_duration(s) for s in (None, 9.7, 187, 3723)] == ["-", "9s", "03:07", "01:02:03"]


# handlers --------------------------------------------------------------------------------------------------------


def _args(tab: TrainTab, **changes):
    values = {**_widget_defaults(tab), "dataset_dir": "/d", "output_name": "shapes", "sample_every": 0, **changes}
    return [values[name] for name in all_fields()]


def test_train_follows_the_run_and_sends_only_what_changed(built_tab):
    finished = JobStatus(state=JobState.FINISHED, method="lora", output_name="shapes", step=10, total=10,
                         losses=[0.5] * 10, output="/m/shapes.safetensors", log=["done"])
    jobs = ScriptedJobs([_running(2), _running(2), _running(5), finished])
    tab = TrainTab(lambda: jobs, poll_seconds=0)
    tab.inputs, tab.method_groups = built_tab.inputs, built_tab.method_groups
    outputs = list(tab.start("task(abc)", "LoRA", *_args(built_tab)))

    request, resume, id_task = jobs.started[0]
    assert (request.output_name, request.dataset_dir, resume, id_task) == ("shapes", "/d", False, "task(abc)")
    assert len(outputs) == 4
    first, same, later, last = outputs
    assert "step 2 / 10" in first[0]["value"] and first[1]["value"].shape == (4, 3)
    assert first[2] == gr.update(value=[], visible=False)  # no samples yet: the gallery stays hidden
    assert all("value" not in u for u in same[:5])  # nothing changed: nothing sent
    assert "step 5 / 10" in later[0]["value"] and later[1]["value"].shape == (10, 3)
    assert "&lt;lora:shapes:1&gt;" in last[4]["value"] and last[3]["value"] == "done"
    # buttons: Train off / Interrupt on while running; at the end Train on, Interrupt off
    assert [u["interactive"] for u in first[5:]] == [False, True, False]
    assert [u["interactive"] for u in last[5:]] == [True, False, False]


def test_errors_are_shown_in_the_tab_not_raised(built_tab):
    from modules import progress
    busy = _running(3)
    jobs = ScriptedJobs([busy], start_error=JobRunningError("a training job is already running"))
    tab = TrainTab(lambda: jobs, poll_seconds=0)
    (out,) = list(tab.start("task(busy)", "LoRA", *_args(built_tab)))
    assert out[4]["value"] == "<div class='error'>a training job is already running</div>"
    assert "step 3 / 10" in out[0]["value"]  # the run that goes on stays shown
    assert "task(busy)" in progress.finished_tasks  # the WebUI's progress bar for the refused id stops

    (out,) = list(tab.start("", "LoRA", *_args(built_tab, steps=2.5)))
    assert "steps must be a whole number" in out[4]["value"] and jobs.started == []

    jobs.start_error = RuntimeError("boom")
    (out,) = list(tab.resume("task(x)", "LoRA", *_args(built_tab)))
    assert out[4]["value"] == "<div class='error'>RuntimeError: boom</div>"


def test_resume_interrupt_and_method_switch(built_tab):
    stopped = JobStatus(state=JobState.INTERRUPTED, method="lora", step=4, total=10, checkpoint="/w/c.state")
    jobs = ScriptedJobs([_running(4), stopped])
    tab = TrainTab(lambda: jobs, poll_seconds=0)
    outputs = list(tab.resume("not a task id", "LoRA", *_args(built_tab)))
    assert jobs.started[0][1:] == (True, None)
    assert "press Resume" in outputs[-1][4]["value"] and outputs[-1][7]["interactive"] is True

    jobs.statuses = [_running(5), stopped]
    outputs = list(tab.interrupt())
    assert jobs.interrupts == 1 and "Interrupted" in outputs[-1][0]["value"]


def test_entry_point_registers_callbacks_and_creates_jobs_lazily(tmp_path):
    import driver
    from modules import script_callbacks
    from webui_tab.host import load_entry_point

    driver.reset_webui(tmp_path)
    module = load_entry_point()
    assert module._jobs is None  # nothing created at import
    ((blocks, title, elem_id),) = script_callbacks.ui_tabs_callback()
    assert (title, elem_id) == ("Train Adapter", "adapters_train") and isinstance(blocks, gr.Blocks)
    assert module._jobs is None
    jobs = module.jobs()
    assert jobs is module.jobs() and jobs.status().state is JobState.IDLE
    script_callbacks.script_unloaded_callback()  # nothing runs: returns at once


def test_a_t2i_run_from_the_tab_is_listed_for_the_next_generation_and_fine_tuning(built_tab, tmp_path):
    """Widget values -> the real job manager on the tiny model -> a file the panel's lists offer by its name,
    which a second run fine-tunes."""
    import driver
    import numpy as np
    from PIL import Image

    from lib_adapters.webui.training.host import TrainingHost
    from lib_adapters.webui.training.jobs import TrainingJobs
    from lib_adapters.webui.training.knobs import adapter_choices
    from training.train_helpers import make_shapes_dataset

    driver.reset_webui(tmp_path / "webui")
    driver.load_tiny_model("sd1")
    dataset = make_shapes_dataset(tmp_path / "dataset", count=2)
    for path in dataset.rglob("*.png"):  # x.sketch.png beside x.png: the image inverted
        with Image.open(path) as im:
            Image.fromarray(255 - np.asarray(im.convert("L"))).save(path.with_name(f"{path.stem}.sketch.png"))
    jobs = TrainingJobs(TrainingHost(work_dir=tmp_path / "work"))
    tab = TrainTab(lambda: jobs, poll_seconds=0.05)
    args = _args(built_tab, dataset_dir=str(dataset), output_name="tab_sketch", resolution=64, steps=2,
                 save_every=0, t2i_condition="sketch", t2i_condition_channels="1", t2i_adapter_kind="light")
    last = list(tab.start("", "T2I-Adapter", *args))[-1]
    status = jobs.wait(120)
    assert status.state is JobState.FINISHED, status.error
    assert status.output == str(tmp_path / "webui" / "models" / "adapters" / "tab_sketch.safetensors")
    assert "select <code>tab_sketch</code> as the model of an Adapters unit" in last[4]["value"]
    assert "tab_sketch" in adapter_choices("t2i_adapter") and "tab_sketch" not in adapter_choices("ip_adapter")
    # fine-tuning it: the listed name is resolved through the panel's catalog
    args = _args(built_tab, dataset_dir=str(dataset), output_name="tab_sketch2", resolution=64, steps=1,
                 save_every=0, t2i_condition="sketch", t2i_condition_channels="1", t2i_adapter_kind="light",
                 t2i_init_from="tab_sketch")
    list(tab.start("", "T2I-Adapter", *args))
    status = jobs.wait(120)
    assert status.state is JobState.FINISHED, status.error
    from lib_adapters.formats.reader import read_safetensors_metadata
    assert read_safetensors_metadata(Path(status.output))["t2i_adapter.init_from"] == "tab_sketch.safetensors"

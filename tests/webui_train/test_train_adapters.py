"""T2I-Adapter and IP-Adapter training in the WebUI through ``TrainingJobs`` + ``TrainingHost`` (stub modules, tiny
SD1 model): the file lands in the Adapters panel's own folder, the panel's catalog lists it at once, and the very next
generation's unit selects it by name and changes the image while weight 0 does not; active LoRAs are out of the run
and the model is restored exactly; an interrupt publishes the checkpoint and resume reaches the uninterrupted
weights; datasets and file names are checked before anything starts."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import driver
from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.formats.ip import load_ip_adapter
from lib_adapters.models.ip_adapter import IPProjection
from lib_adapters.formats.reader import read_safetensors_metadata, read_state_dict
from lib_adapters.formats.t2i import load_t2i_adapter
from lib_adapters.training.data import DatasetInvalidError
from lib_adapters.webui.training.host import TrainingHost
from lib_adapters.training.request import TrainRequest
from lib_adapters.webui.training.jobs import JobState, TrainingJobs
from test_panel_e2e import _load_script_module
from test_train_jobs import RecordingHost, model_snapshot, user_lora
from train_helpers import make_shapes_dataset

TIMEOUT = 120


@pytest.fixture
def panel(webui):
    """The Adapters script in txt2img (its catalog scanned before any training), a tiny CLIP vision encoder in
    models/clip_vision, and conditions (``x.depth.png``: the image inverted) beside the dataset's images."""
    module = _load_script_module()
    import lib_adapters.webui.panel as panel_module
    panel_module._resources = None
    models = webui.root / "models"
    encoder = save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript])
    images = sorted(p for p in (webui.dataset / "2_shapes").glob("*.png"))
    assert panel_module.resources().model_choices() == ["None"]
    try:
        yield SimpleNamespace(module=panel_module, adapters=models / "adapters", encoder=encoder, images=images)
    finally:
        module.release_resources()
        panel_module._resources = None


def add_conditions(images, condition="depth"):
    for path in images:
        with Image.open(path) as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(path.with_name(f"{path.stem}.{condition}.png"))


def request(webui, name, method, **changes) -> TrainRequest:
    values = dict(dataset_dir=str(webui.dataset), output_name=name, method=method, resolution=64, steps=3,
                  batch_size=2, learning_rate=1e-3, save_every=0, seed=3)
    values.update(changes)
    return TrainRequest.from_dict(values)


def generate(unit: dict | None = None) -> tuple[np.ndarray, str]:
    scripts = {"Adapters": [unit]} if unit is not None else None
    processed = driver.txt2img(prompt="a red circle", seed=5, steps=3, alwayson_scripts=scripts)
    return np.asarray(processed.images[0], dtype=np.float32), processed.infotexts[0]


def run(jobs: TrainingJobs, req: TrainRequest, *, resume: bool = False):
    jobs.start(req, resume=resume)
    return jobs.wait(TIMEOUT)


def assert_used_by_the_next_generation(panel, name: str, image: np.ndarray, weight: float = 1.0):
    """Listed by the panel's catalog without a refresh click; a unit naming it changes the image; weight 0 does not."""
    catalog = panel.module.resources().catalog
    assert name in catalog.names()
    path = panel.adapters / f"{name}.safetensors"
    base, _ = generate()
    used, infotext = generate({"enabled": True, "model": name, "image": image, "weight": weight})
    zero, _ = generate({"enabled": True, "model": name, "image": image, "weight": 0.0})
    assert f"{name} [{catalog.short_hash(path)}]" in infotext and "skipped" not in infotext
    assert np.abs(used - base).mean() > 0.5
    assert np.array_equal(zero, base)


def test_t2i_run_lands_in_models_adapters_and_drives_the_next_generation(webui, panel):
    add_conditions(panel.images)
    user_lora(webui)
    driver.txt2img(prompt="a red circle <lora:user:1>", seed=5, steps=3)  # the user's LoRA is active and merged
    [user] = list(webui.networks.loaded_networks)
    before = model_snapshot(webui.model)
    seen = []
    host = RecordingHost(lambda p: seen.append(list(webui.networks.loaded_networks)))
    final = run(TrainingJobs(host), request(webui, "shapes_depth", "t2i_adapter", t2i_condition="depth",
                                            t2i_adapter_kind="light", t2i_timesteps="cubic"))

    assert final.state is JobState.FINISHED, final.error
    target = panel.adapters / "shapes_depth.safetensors"
    assert final.output == str(target) and sorted(p.name for p in panel.adapters.iterdir()) == [target.name]
    loaded = load_t2i_adapter(target)
    assert (loaded.config.kind.value, loaded.config.image_channels, loaded.config.num_res_blocks) == ("light", 3, 4)
    assert {t.dtype for t in read_state_dict(target).values()} == {torch.float16}  # save_precision's default
    meta = read_safetensors_metadata(target)
    assert meta["t2i_adapter.condition"] == "depth" and meta["t2i_adapter.steps"] == "3"
    assert meta["t2i_adapter.timesteps"] == "cubic"
    assert seen == [[]] * 3 and list(webui.networks.loaded_networks) == [user]  # no LoRA in the trained base
    after = model_snapshot(webui.model)
    assert before["flags"] == after["flags"] and before["forwards"] == after["forwards"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert any("is in the Adapters panel's model list" in line for line in final.log)
    webui.networks.load_networks([])
    with Image.open(panel.images[0].with_name("0.depth.png")) as im:
        assert_used_by_the_next_generation(panel, "shapes_depth", np.asarray(im.convert("RGB")))


def test_ip_run_with_an_encoder_named_as_in_models_clip_vision_drives_the_next_generation(webui, panel):
    req = request(webui, "shapes_ip", "ip_adapter", ip_projection="plus", ip_image_encoder=panel.encoder.stem,
                  learning_rate=1e-2, save_precision="fp32")
    final = run(TrainingJobs(TrainingHost()), req)

    assert final.state is JobState.FINISHED, final.error
    target = panel.adapters / "shapes_ip.safetensors"
    assert final.output == str(target) and target.is_file()
    loaded = load_ip_adapter(target)
    assert loaded.variant is IPProjection.PLUS and loaded.projection.num_tokens == 16
    assert loaded.encoder_need.hidden_states and loaded.encoder_need.width == 96  # the tiny encoder's hidden size
    meta = read_safetensors_metadata(target)
    assert meta["clip_vision_encoder"] and meta["steps"] == "3" and meta["ip_projection"] == "plus"
    assert {t.dtype for t in read_state_dict(target).values()} == {torch.float32}
    with Image.open(panel.images[1]) as im:
        assert_used_by_the_next_generation(panel, "shapes_ip", np.asarray(im.convert("RGB")), weight=2.0)


def test_an_interrupted_t2i_run_is_published_and_resume_reaches_the_uninterrupted_weights(webui, panel):
    from modules import shared
    add_conditions(panel.images)

    def on_step(p):
        if p.step == 2 and not resumed:
            shared.state.interrupt()  # the WebUI's Interrupt button

    resumed = []
    jobs = TrainingJobs(RecordingHost(on_step))
    req = request(webui, "cut", "t2i_adapter", steps=4, t2i_condition="depth", save_precision="fp32")
    first = run(jobs, req)
    assert first.state is JobState.INTERRUPTED and first.step == 2
    assert first.output == str(panel.adapters / "cut.safetensors")
    assert read_safetensors_metadata(first.output)["t2i_adapter.steps"] == "2"
    assert "cut" in panel.module.resources().catalog.names()
    resumed.append(True)
    second = run(jobs, req, resume=True)
    assert second.state is JobState.FINISHED and second.step == 4 and len(second.losses) == 2
    straight = run(jobs, request(webui, "straight", "t2i_adapter", steps=4, t2i_condition="depth",
                                 save_precision="fp32"))
    a, b = read_state_dict(second.output), read_state_dict(straight.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_t2i_datasets_are_checked_file_by_file_before_anything_starts(webui, panel):
    jobs = TrainingJobs(TrainingHost())
    add_conditions(panel.images[:1])
    with pytest.raises(DatasetInvalidError) as info:
        jobs.start(request(webui, "nope", "t2i_adapter", t2i_condition="depth"), id_task="task(t2i-bad)")
    message = str(info.value)
    assert "3 problem(s)" in message and "missing condition" in message and "choose a preprocessor" in message
    for name in ("1.png", "2.png", "3.png"):
        assert f"2_shapes/{name}" in message
    assert jobs.status().state is JobState.IDLE and not webui.queue_lock.locked()
    assert "task(t2i-bad)" not in webui.progress.pending_tasks
    with pytest.raises(DatasetInvalidError, match="3 problem"):  # the panel's "none" is no preprocessor
        jobs.start(request(webui, "nope", "t2i_adapter", t2i_condition="depth", t2i_preprocessor="None"))
    with pytest.raises(InputError, match="Unknown preprocessor 'depht'"):
        jobs.start(request(webui, "nope", "t2i_adapter", t2i_condition="depth", t2i_preprocessor="depht"))

    # with a preprocessor the missing conditions are made by the run (not while the request is answered)
    cache = TrainingHost().work_dir() / "cache"
    with webui.queue_lock:
        status = jobs.start(request(webui, "edges", "t2i_adapter", steps=1, t2i_condition="depth",
                                    t2i_preprocessor="canny", t2i_condition_channels=1))
        assert status.state is JobState.RUNNING and not cache.exists()
    assert jobs.wait(TIMEOUT).state is JobState.FINISHED
    assert sorted(p.name for p in cache.rglob("*.png")) == ["1.depth.png", "2.depth.png", "3.depth.png"]


def test_fine_tuning_starts_from_a_file_named_as_the_panel_lists_it(webui, panel, tmp_path):
    add_conditions(panel.images)
    jobs = TrainingJobs(TrainingHost())
    first = run(jobs, request(webui, "base_depth", "t2i_adapter", steps=1, t2i_condition="depth"))
    assert first.state is JobState.FINISHED, first.error
    digest = panel.module.resources().catalog.short_hash(Path(first.output))
    tuned = run(jobs, request(webui, "tuned", "t2i_adapter", steps=1, t2i_condition="depth",
                              t2i_init_from=f"base_depth [{digest}]"))
    assert tuned.state is JobState.FINISHED, tuned.error
    assert read_safetensors_metadata(tuned.output)["t2i_adapter.init_from"] == "base_depth.safetensors"
    with pytest.raises(MissingFileError, match="t2i_init_from: adapter model 'nothing' not found"):
        jobs.start(request(webui, "x", "t2i_adapter", t2i_condition="depth", t2i_init_from="nothing"))
    plain = str(make_shapes_dataset(tmp_path / "plain"))  # no condition files (they would be images to IP)
    with pytest.raises(MissingFileError, match=r"ip_image_encoder: no CLIP vision encoder 'vit-h'.*clip_vision_tiny"):
        jobs.start(request(webui, "x", "ip_adapter", dataset_dir=plain, ip_image_encoder="vit-h"))
    # no encoder named: the released adapters' one (ViT-H/14 for SD1.5 plain) is looked up as the panel does
    with pytest.raises(MissingFileError, match="ViT-H/14 .image embeddings of width 1024. CLIP vision encoder and no"):
        jobs.start(request(webui, "x", "ip_adapter", dataset_dir=plain))
    assert jobs.status().state is JobState.FINISHED and jobs.status().output_name == "tuned"


def test_an_sdxl_t2i_run_drives_the_next_sdxl_generation(webui, panel):
    add_conditions(panel.images)
    model = driver.load_tiny_model("sdxl")
    before = model_snapshot(model)
    final = run(TrainingJobs(TrainingHost()), request(webui, "xl_depth", "t2i_adapter", t2i_condition="depth",
                                                      steps=2))
    assert final.state is JobState.FINISHED, final.error
    loaded = load_t2i_adapter(final.output)
    assert loaded.config.sdxl and loaded.config.unshuffle == 16
    after = model_snapshot(model)
    assert before["forwards"] == after["forwards"]
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    with Image.open(panel.images[0].with_name("0.depth.png")) as im:
        assert_used_by_the_next_generation(panel, "xl_depth", np.asarray(im.convert("RGB")))

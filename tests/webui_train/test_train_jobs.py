"""Training in the WebUI through ``TrainingJobs`` + ``TrainingHost`` over the stub modules and the tiny SD1 model:
the LoRA lands in the Lora dir and works in the next generation, the queue lock is held for the whole run, active
LoRAs are unloaded and put back, the model is restored bit for bit, progress reaches shared.state and the WebUI's
task bookkeeping, both interrupts save a resumable checkpoint, bad datasets and non-finite losses are reported."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import driver
from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.training.backends.ldm import LdmBackend
from lib_adapters.training.config import LoraConfig
from lib_adapters.training.data import DatasetInvalidError
from lib_adapters.training.methods.lora import build_lora_network
from lib_adapters.training.methods.lora_file import load_lora, save_lora
from lib_adapters.webui.training.host import TrainingHost
from lib_adapters.training.request import TrainRequest
from lib_adapters.webui.training.jobs import JobRunningError, JobState, TrainingJobs

TIMEOUT = 120


def request(webui, name: str = "shapes", **changes) -> TrainRequest:
    values = dict(dataset_dir=str(webui.dataset), output_name=name, resolution=64, steps=6, batch_size=2,
                  learning_rate=1e-3, rank=4, alpha=4.0, save_every=0, seed=3)
    values.update(changes)
    return TrainRequest.from_dict(values)


class RecordingHost(TrainingHost):
    """The real host; ``on_step(progress)`` runs inside ``report`` (in the training thread, lock held)."""

    def __init__(self, on_step=None, **kwargs):
        super().__init__(**kwargs)
        self.on_step = on_step
        self.steps: list[dict] = []

    def report(self, p, first_step, method, output_name):
        super().report(p, first_step, method, output_name)
        from modules import call_queue, progress, shared
        s = shared.state
        self.steps.append(dict(step=p.step, locked=call_queue.queue_lock.locked(), job_count=s.job_count,
                               job_no=s.job_no, sampling_step=s.sampling_step, sampling_steps=s.sampling_steps,
                               textinfo=s.textinfo, current_task=progress.current_task, job=s.job))
        if self.on_step is not None:
            self.on_step(p)


def user_lora(webui, name: str = "user", seed: int = 11):
    """A random LoRA file in the Lora dir, as a user would have, named ``name``."""
    network = build_lora_network(LdmBackend(webui.model), LoraConfig(rank=2, alpha=2.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.5)
    path = webui.lora_dir / f"{name}.safetensors"
    save_lora(path, network.kohya_state_dict(torch.float32), {"ss_output_name": name})
    webui.networks.list_available_networks()
    return path


def generate(prompt: str) -> np.ndarray:
    processed = driver.txt2img(prompt=prompt, seed=5, steps=3)
    return np.asarray(processed.images[0], dtype=np.float32)


def model_snapshot(model):
    unet = model.model.diffusion_model
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                flags=[(n, p.requires_grad) for n, p in model.named_parameters()],
                modes=[(n, m.training) for n, m in model.named_modules()],
                forwards=[(n, m.__dict__.get("forward")) for n, m in unet.named_modules()],
                hooks=[(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()])


def unet_output(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red circle"])
        return model.model(x, torch.tensor([500]), c_crossattn=[cond])


def test_a_run_lands_in_the_lora_dir_with_the_lock_held_and_progress_in_the_webui(webui):
    events: list[str] = []
    outputs: dict = {}

    def generation():
        from modules import call_queue
        with call_queue.queue_lock:  # what wrap_gradio_gpu_call and the API's txt2img do
            events.append("generation")
            outputs["with"] = generate("a red circle <lora:shapes:1>")
            outputs["loaded"] = list(webui.networks.loaded_networks)
        outputs["without"] = generate("a red circle")

    waiter = threading.Thread(target=generation)

    def on_step(p):
        events.append(f"step {p.step}")
        if p.step == 1:
            waiter.start()
            time.sleep(0.3)  # the generation has had time to try the lock: it must still be waiting

    host = RecordingHost(on_step)
    jobs = TrainingJobs(host)
    status = jobs.start(request(webui), id_task="task(adapters-train-1)")
    assert status.state is JobState.RUNNING and status.total == 6
    final = jobs.wait(TIMEOUT)
    waiter.join(TIMEOUT)

    assert final.state is JobState.FINISHED, final.error
    target = webui.lora_dir / "shapes.safetensors"
    assert final.output == str(target) and target.is_file()
    assert not list(webui.lora_dir.glob("*-checkpoints")) and len(final.losses) == 6 and final.step == 6
    tensors, metadata = load_lora(target)
    assert metadata["ss_output_name"] == "shapes" and metadata["ss_steps"] == "6"
    # the lock was held at every step, and the generation that asked for it in step 1 ran after the run
    assert [s["locked"] for s in host.steps] == [True] * 6
    assert events == [f"step {i}" for i in range(1, 7)] + ["generation"]
    # the WebUI's progress machinery followed the run
    assert [s["sampling_step"] for s in host.steps] == [1, 2, 3, 4, 5, 6]
    assert {(s["job_count"], s["job_no"], s["sampling_steps"], s["current_task"], s["job"]) for s in host.steps} == \
        {(1, 0, 6, "task(adapters-train-1)", "task(adapters-train-1)")}
    assert "step 3/6" in host.steps[2]["textinfo"] and "loss" in host.steps[2]["textinfo"] \
        and "ETA" in host.steps[2]["textinfo"]
    assert "task(adapters-train-1)" in webui.progress.finished_tasks and webui.progress.current_task is None
    assert "task(adapters-train-1)" not in webui.progress.pending_tasks
    # the Lora list was refreshed before the lock was released: the very next generation applied the new LoRA
    assert "shapes" in webui.networks.available_networks
    [net] = outputs["loaded"]
    assert net.name == "shapes" and net.unmatched == {} and len(net.modules) == len(tensors) // 3
    assert np.abs(outputs["with"] - outputs["without"]).max() > 0.5
    assert any("finished at step 6" in line for line in final.log)


def test_active_loras_are_unloaded_for_the_run_and_everything_is_restored_exactly(webui):
    user_lora(webui)
    plain = generate("a blue square")
    with_user = generate("a blue square <lora:user:1>")
    assert np.abs(plain - with_user).max() > 0.5  # the user's LoRA is active and merged into the weights
    [user] = list(webui.networks.loaded_networks)
    layer = webui.model.network_layer_mapping["diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    assert not torch.equal(layer.weight, layer.network_weights_backup)
    before, output_before = model_snapshot(webui.model), unet_output(webui.model)
    seen = []
    from modules import shared
    hypernetwork = object()  # a loaded <hypernet:...> stays in this list and acts in every cross-attention
    shared.loaded_hypernetworks[:] = [hypernetwork]

    def on_step(p):
        seen.append((list(webui.networks.loaded_networks), torch.equal(layer.weight, layer.network_weights_backup),
                     layer.weight.requires_grad, list(shared.loaded_hypernetworks)))

    jobs = TrainingJobs(RecordingHost(on_step))
    jobs.start(request(webui, steps=3))
    assert jobs.wait(TIMEOUT).state is JobState.FINISHED
    # during the run: no network loaded, the base weights were the user's un-merged originals, frozen
    assert seen == [([], True, False, [])] * 3
    assert shared.loaded_hypernetworks == [hypernetwork]
    after = model_snapshot(webui.model)
    assert list(webui.networks.loaded_networks) == [user]
    assert before["flags"] == after["flags"] and before["modes"] == after["modes"]
    assert before["forwards"] == after["forwards"] and before["hooks"] == after["hooks"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert torch.equal(output_before, unet_output(webui.model))
    assert np.array_equal(generate("a blue square <lora:user:1>"), with_user)


def test_interrupts_save_a_resumable_checkpoint_and_resume_reaches_the_uninterrupted_weights(webui):
    from modules import shared
    stop_at = {"webui": 2, "ours": 5}
    jobs_holder = {}

    def on_step(p):
        if p.step == stop_at["webui"]:
            shared.state.interrupt()  # the WebUI's Interrupt button
        if p.step == stop_at["ours"]:
            jobs_holder["jobs"].interrupt()

    jobs = jobs_holder["jobs"] = TrainingJobs(RecordingHost(on_step))
    req = request(webui, "resumed", steps=7)
    jobs.start(req)
    first = jobs.wait(TIMEOUT)
    assert first.state is JobState.INTERRUPTED and first.step == 2 and first.error is None
    assert first.checkpoint.endswith("resumed-step000002.state")
    assert first.output == str(webui.lora_dir / "resumed.safetensors")
    tensors, metadata = load_lora(first.output)
    assert metadata["ss_steps"] == "2" and "resumed" in webui.networks.available_networks
    assert not shared.state.interrupted  # cleared for the next generation

    assert jobs.resume(req).state is JobState.RUNNING
    second = jobs.wait(TIMEOUT)
    assert second.state is JobState.INTERRUPTED and second.step == 5 and len(second.losses) == 3
    assert second.checkpoint.endswith("resumed-step000005.state")

    stop_at.update(webui=-1, ours=-1)
    jobs.resume(req)
    third = jobs.wait(TIMEOUT)
    assert third.state is JobState.FINISHED and third.step == 7 and len(third.losses) == 2
    resumed, metadata = load_lora(third.output)
    assert metadata["ss_steps"] == "7"

    jobs.start(request(webui, "straight", steps=7))
    straight = jobs.wait(TIMEOUT)
    assert straight.state is JobState.FINISHED
    reference, _ = load_lora(straight.output)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_without_a_checkpoint_and_a_second_start_are_refused(webui):
    jobs = TrainingJobs(TrainingHost())
    with pytest.raises(MissingFileError, match="no checkpoint of 'never'"):
        jobs.start(request(webui, "never"), resume=True)
    assert jobs.status().state is JobState.IDLE
    with webui.queue_lock:  # a generation is running: the job waits for the lock
        jobs.start(request(webui, "waiting"), id_task="task(t-2)")
        assert webui.progress.pending_tasks.get("task(t-2)") is not None  # "In queue" in the WebUI's progress bar
        with pytest.raises(JobRunningError, match="already running"):
            jobs.start(request(webui, "other"))
        status = jobs.interrupt()
        assert status.state is JobState.RUNNING
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.INTERRUPTED and final.step == 0 and final.output is None
    assert any("waiting for the running generation to finish" in line for line in final.log)
    assert not (webui.lora_dir / "waiting.safetensors").exists()


def test_a_bad_dataset_lists_every_file_and_starts_nothing(webui, tmp_path):
    bad = tmp_path / "bad" / "1_things"
    bad.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(bad / "no_caption.png")
    (bad / "broken.png").write_bytes(b"not an image")
    (bad / "broken.txt").write_text("broken")
    Image.new("RGB", (16, 16), "red").save(bad / "tiny.png")
    (bad / "tiny.txt").write_text("tiny")
    jobs = TrainingJobs(TrainingHost())
    with pytest.raises(DatasetInvalidError) as info:
        jobs.start(request(webui, dataset_dir=str(tmp_path / "bad")), id_task="task(bad)")
    message = str(info.value)
    assert isinstance(info.value, InputError)
    for name in ("no_caption.png", "broken.png", "tiny.png"):
        assert name in message
    assert jobs.status().state is JobState.IDLE and "task(bad)" not in webui.progress.pending_tasks
    assert not webui.queue_lock.locked()
    with pytest.raises(InputError, match="steps must be an integer in 1"):
        jobs.start(request(webui, steps=0))
    with pytest.raises(InputError, match="unknown field"):
        TrainRequest.from_dict({"dataset_dir": "x", "output_name": "y", "stpes": 3})


def test_a_non_finite_loss_fails_the_job_and_names_the_last_checkpoint(webui):
    calls = {"n": 0}

    class PoisonedHost(RecordingHost):
        def make_backend(self, method="lora"):
            backend = super().make_backend(method)
            apply = backend.apply

            def poisoned(noisy, timesteps, cond):
                calls["n"] += 1
                out = apply(noisy, timesteps, cond)
                return out * float("nan") if calls["n"] == 5 else out

            backend.apply = poisoned
            return backend

    before = model_snapshot(webui.model)
    jobs = TrainingJobs(PoisonedHost())
    jobs.start(request(webui, "poisoned", steps=6, batch_size=1, save_every=2))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FAILED and final.step == 4
    assert "step 5" in final.error and "bf16" in final.error and "lower learning rate" in final.error
    assert final.checkpoint.endswith("poisoned-step000004.state") and final.checkpoint in final.error
    assert final.output is None and not (webui.lora_dir / "poisoned.safetensors").exists()
    after = model_snapshot(webui.model)
    assert before["flags"] == after["flags"] and all(torch.equal(before["state"][k], after["state"][k])
                                                     for k in before["state"])
    assert any(line.split(" ", 1)[1].startswith("failed: the loss became nan") for line in final.log)


def test_a_nan_caption_conditioning_names_the_caption_and_the_webuis_emphasis_setting(webui):
    """In the real WebUI a degenerate text encoder made the emphasis step divide by a zero mean: step 1's loss was
    NaN before any update, and "lower the learning rate" was the wrong advice."""
    from train_helpers import poison_black_images, poison_word

    from modules import shared
    poison_word(webui.model.cond_stage_model, "yellow")  # "a yellow square": 2_shapes/3.txt
    jobs = TrainingJobs(TrainingHost())
    jobs.start(request(webui, "caption"))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FAILED and final.step <= 1  # step 1 or 2 draws the caption
    assert "the text conditioning of caption 'a yellow square' (2_shapes/3.txt) is NaN" in final.error, final.error
    assert '"Emphasis mode" (option `emphasis`) is "Original"' in final.error
    assert '"No norm" or "None"' in final.error and "lower learning rate" not in final.error
    assert final.output is None and not (webui.lora_dir / "caption.safetensors").exists()

    shared.opts.emphasis = "No norm"  # the setting changed and the NaN stays: the emphasis is not the cause
    jobs.start(request(webui, "caption"))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FAILED and 'Emphasis mode" is "No norm", which does not rescale' in final.error

    Image.new("RGB", (64, 64)).save(webui.dataset / "2_shapes" / "night.png")
    (webui.dataset / "2_shapes" / "night.txt").write_text("a black night")
    model = driver.load_tiny_model("sd1")
    poison_black_images(model)
    jobs.start(request(webui, "latents"))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FAILED, final.error
    assert "the latents of 2_shapes/night.png (the VAE's encoding) are NaN" in final.error
    assert "--no-half-vae" in final.error and "Emphasis" not in final.error


def test_medvram_lowvram_and_no_model_are_refused_before_anything_starts(webui, monkeypatch):
    jobs = TrainingJobs(TrainingHost())
    monkeypatch.setattr(webui.model, "lowvram", True, raising=False)  # what --medvram/--lowvram set on load
    with pytest.raises(InputError, match="--medvram or --lowvram"):
        jobs.start(request(webui))
    from modules import shared
    monkeypatch.setattr(shared, "sd_model", None)
    with pytest.raises(MissingFileError, match="no Stable Diffusion checkpoint is loaded"):
        jobs.start(request(webui))
    assert jobs.status().state is JobState.IDLE


def test_fresh_runs_set_earlier_checkpoints_aside_each_under_its_own_name_and_delete_none(webui):
    host = TrainingHost()
    work = host.work_dir()
    old = work / "again-checkpoints"
    old.mkdir(parents=True)
    for suffix in (".state", ".safetensors"):
        (old / f"again-step000900{suffix}").write_bytes(b"old run")
    jobs = TrainingJobs(host)
    for overwrite in (False, True):  # the second run replaces the first one's file: it must say so
        jobs.start(request(webui, "again", steps=2, overwrite=overwrite))
        assert jobs.wait(TIMEOUT).state is JobState.FINISHED
    aside = sorted(p for p in work.iterdir() if p.name.startswith("again-checkpoints-"))
    assert len(aside) == 2, aside  # the fake run's folder, then the first real run's: both kept
    contents = [sorted(p.name for p in folder.iterdir()) for folder in aside]
    assert ["again-step000900.safetensors", "again-step000900.state"] in contents
    assert ["again-step000002.safetensors", "again-step000002.state"] in contents
    assert b"old run" in [(folder / "again-step000900.state").read_bytes() for folder in aside
                          if (folder / "again-step000900.state").exists()]
    assert sorted(p.name for p in old.iterdir()) == ["again-step000002.safetensors", "again-step000002.state"]
    assert any("earlier run's checkpoints of 'again' are kept in" in line for line in jobs.status().log)


def test_sdxl_through_the_jobs_and_the_next_generation(webui):
    model = driver.load_tiny_model("sdxl")
    webui.networks.assign_network_names_to_compvis_modules(model)
    before = model_snapshot(model)
    jobs = TrainingJobs(TrainingHost())
    jobs.start(request(webui, "xl", steps=3, learning_rate=5e-3))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FINISHED, final.error
    after = model_snapshot(model)
    assert before["flags"] == after["flags"] and all(torch.equal(before["state"][k], after["state"][k])
                                                     for k in before["state"])
    tensors, metadata = load_lora(final.output)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    with_lora = generate("a red circle <lora:xl:1>")
    [net] = webui.networks.loaded_networks
    assert net.unmatched == {} and len(net.modules) == len(tensors) // 3
    assert np.abs(with_lora - generate("a red circle")).max() > 0.5


def test_a_lora_still_merged_after_its_prompt_is_gone_is_not_trained_into_the_base(webui):
    user_lora(webui)
    generate("a blue square <lora:user:1>")
    webui.networks.load_networks([])  # a prompt without <lora:...>: the layers un-merge lazily, at their next forward
    layer = webui.model.network_layer_mapping["diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    assert not torch.equal(layer.weight, layer.network_weights_backup)
    seen = []
    jobs = TrainingJobs(RecordingHost(lambda p: seen.append(torch.equal(layer.weight, layer.network_weights_backup))))
    jobs.start(request(webui, steps=2))
    assert jobs.wait(TIMEOUT).state is JobState.FINISHED
    assert seen == [True, True] and torch.equal(layer.weight, layer.network_weights_backup)
    assert webui.networks.loaded_networks == []


def test_a_capped_caption_is_one_warning_in_the_jobs_log(webui):
    (webui.dataset / "2_shapes" / "1.txt").write_text("blue, " * 500_000)  # 3 MB; 2 repeats, read every epoch
    jobs = TrainingJobs(TrainingHost())
    jobs.start(request(webui, "capped", steps=4))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FINISHED, final.error
    warnings = [line for line in final.log if " warning: " in line]
    assert len(warnings) == 1 and str(webui.dataset / "2_shapes" / "1.txt") in warnings[0], final.log

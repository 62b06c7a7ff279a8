"""Nothing a user had is lost by training in the WebUI: a file of another run under the output name is never
replaced without ``overwrite`` (the tab's checkbox, the API field), a resumed run replaces only what it published
itself, a fresh run keeps every earlier run's checkpoints, temporary files of a killed run are cleared, published
files get the usual permissions, and a full disk fails the job with a message naming the file."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_adapters.training.methods.lora_file import load_lora
from lib_adapters.training.outputs import OutputExistsError
from lib_adapters.webui.training.api import PREFIX, register_api
from lib_adapters.webui.training.host import TrainingHost
from lib_adapters.webui.training.jobs import JobState, TrainingJobs
from test_train_jobs import TIMEOUT, RecordingHost, request, user_lora


def test_a_taken_name_is_refused_unless_overwrite_and_resume_replaces_only_its_own_file(webui):
    from modules import shared

    users = user_lora(webui, "taken")
    before = users.read_bytes()
    jobs = TrainingJobs(RecordingHost(lambda p: p.step == 2 and shared.state.interrupt()))
    with pytest.raises(OutputExistsError) as refused:
        jobs.start(request(webui, "taken", steps=4))
    message = str(refused.value)
    assert str(users) in message and "another output name" in message and "Overwrite an existing file" in message
    assert '"overwrite": true' in message
    host_work = TrainingHost().work_dir() / "taken-checkpoints"
    assert jobs.status().state is JobState.IDLE and users.read_bytes() == before and not host_work.exists()

    jobs.start(request(webui, "taken", steps=4, overwrite=True))
    first = jobs.wait(TIMEOUT)
    assert first.state is JobState.INTERRUPTED and first.step == 2 and first.output == str(users)
    run_id = load_lora(users)[1]["ss_session_id"]
    assert users.read_bytes() != before and (host_work / "taken-step000002.state").exists()

    jobs.resume(request(webui, "taken", steps=4))  # no overwrite: the file is this run's own
    second = jobs.wait(TIMEOUT)
    assert second.state is JobState.FINISHED and second.step == 4, second.error
    _, metadata = load_lora(users)
    assert metadata["ss_steps"] == "4" and metadata["ss_session_id"] == run_id  # one run over its sessions

    user_lora(webui, "taken", seed=12)  # the user puts another file under the name: resume must not replace it
    mine = users.read_bytes()
    with pytest.raises(OutputExistsError, match="taken.safetensors already exists"):
        jobs.resume(request(webui, "taken", steps=6))
    assert users.read_bytes() == mine


def test_a_file_that_appears_during_the_run_is_not_replaced_and_the_weights_are_kept(webui):
    def on_step(p):
        if p.step == 1:
            user_lora(webui, "late")

    jobs = TrainingJobs(RecordingHost(on_step))
    jobs.start(request(webui, "late", steps=2))
    final = jobs.wait(TIMEOUT)
    assert final.state is JobState.FAILED and "late.safetensors already exists" in final.error
    kept = TrainingHost().work_dir() / "late-checkpoints" / "late-step000002.safetensors"
    assert f"The trained weights are kept in {kept}" in final.error and kept.is_file()
    assert load_lora(kept)[1]["ss_steps"] == "2" and final.checkpoint == str(kept.with_suffix(".state"))
    users = load_lora(webui.lora_dir / "late.safetensors")[1]
    assert users["ss_output_name"] == "late" and "ss_session_id" not in users  # still the user's file


def test_the_api_refuses_a_taken_name_with_400_and_takes_overwrite(webui, monkeypatch):
    client = TestClient(FastAPI())
    jobs = TrainingJobs(TrainingHost())
    register_api(client.app, jobs)
    users = user_lora(webui, "api_taken")
    values = dict(dataset_dir=str(webui.dataset), output_name="api_taken", resolution=64, steps=1, batch_size=2,
                  rank=4, alpha=4, save_every=0)
    refused = client.post(PREFIX, json=values)
    assert refused.status_code == 400 and str(users) in refused.json()["detail"]
    assert '"overwrite": true' in refused.json()["detail"] and jobs.status().state is JobState.IDLE
    monkeypatch.setitem(webui.shared.opts.data, "CLIP_stop_at_last_layers", 2)  # the WebUI's "Clip skip"
    started = client.post(PREFIX, json=dict(values, overwrite=True))
    assert started.status_code == 200, started.text
    assert jobs.wait(TIMEOUT).state is JobState.FINISHED
    metadata = load_lora(users)[1]
    assert metadata["ss_steps"] == "1" and metadata["ss_clip_skip"] == "2"  # kohya's keys, from the WebUI's facts
    assert metadata["ss_new_sd_model_hash"] == webui.model.sd_checkpoint_info.sha256


def _failing_write(monkeypatch, target):
    """The LoRA writer (the publish step exports through the method) raises ENOSPC when it writes ``target``'s
    temporary file, after writing part of it."""
    from lib_adapters.training.methods import lora_file

    real = lora_file.save_file

    def save_file(tensors, tmp, metadata=None):
        if Path(tmp).name.startswith(f".{target.name}."):
            Path(tmp).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tensors, tmp, metadata)

    monkeypatch.setattr(lora_file, "save_file", save_file)


def test_a_full_disk_fails_the_job_naming_the_file_and_resume_continues_from_the_last_good_checkpoint(
        webui, monkeypatch):
    from lib_adapters.training.methods import lora_file
    from lib_adapters.webui.training.view import render_status

    real = lora_file.save_file

    def save_file(tensors, tmp, metadata=None):
        if Path(tmp).name.startswith(".full-step000004.safetensors."):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tensors, tmp, metadata)

    monkeypatch.setattr(lora_file, "save_file", save_file)
    jobs = TrainingJobs(TrainingHost())
    checkpoints = TrainingHost().work_dir() / "full-checkpoints"
    jobs.start(request(webui, "full", steps=6, save_every=2))
    failed = jobs.wait(TIMEOUT)
    assert failed.state is JobState.FAILED and failed.checkpoint == str(checkpoints / "full-step000002.state")
    assert failed.error.startswith(f"the disk is full: {checkpoints / 'full-step000004.safetensors'} could not be "
                                   "written (")
    assert f"the last good checkpoint {checkpoints / 'full-step000002.state'} is kept: Resume continues" in failed.error
    assert "the disk is full" in render_status(failed).result and "Traceback" not in failed.error
    assert not (webui.lora_dir / "full.safetensors").exists()

    monkeypatch.undo()
    target = webui.lora_dir / "full.safetensors"
    _failing_write(monkeypatch, target)  # now the Lora folder's disk is full when the finished file is published
    jobs.resume(request(webui, "full", steps=6, save_every=2))
    second = jobs.wait(TIMEOUT)
    assert second.state is JobState.FAILED and f"the disk is full: {target} could not be written" in second.error
    assert second.checkpoint == str(checkpoints / "full-step000006.state") and not target.exists()
    assert not [p for p in webui.lora_dir.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()
    jobs.resume(request(webui, "full", steps=6, save_every=2))
    assert jobs.wait(TIMEOUT).state is JobState.FINISHED and load_lora(target)[1]["ss_steps"] == "6"


def test_temporary_files_of_the_name_are_cleared_and_the_published_file_is_0644(webui):
    host = TrainingHost()
    work, checkpoints = host.work_dir(), host.work_dir() / "tidy-checkpoints"
    checkpoints.mkdir(parents=True)
    ours = [webui.lora_dir / ".tidy.safetensors.k2x9a0b1.tmp", work / ".tidy.safetensors.00aa11bb.tmp",
            checkpoints / ".tidy-step000002.state.abcdefgh.tmp"]
    others = [webui.lora_dir / ".user.safetensors.k2x9a0b1.tmp", webui.lora_dir / "tidy.safetensors.tmp",
              work / ".tidy.safetensors.tmp"]
    for path in ours + others:
        path.write_bytes(b"x")
    previous = os.umask(0o022)
    try:
        jobs = TrainingJobs(host)
        jobs.start(request(webui, "tidy", steps=1))
        final = jobs.wait(TIMEOUT)
    finally:
        os.umask(previous)
    assert final.state is JobState.FINISHED, final.error
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert sum(f"removed {p}, left by a run that was killed" in line for p in ours for line in final.log) == 3
    assert Path(final.output).stat().st_mode & 0o777 == 0o644

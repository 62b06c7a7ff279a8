"""The training web API over FastAPI's TestClient: start, status, interrupt, resume, 409 on a second start,
422/400 with a clear message on malformed or impossible requests, and the WebUI's --api-auth."""
from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_adapters.webui.training.api import PREFIX, register_api
from lib_adapters.webui.training.host import TrainingHost
from lib_adapters.webui.training.jobs import TrainingJobs

TIMEOUT = 120


@pytest.fixture
def api(webui):
    jobs = TrainingJobs(TrainingHost())
    app = FastAPI()
    register_api(app, jobs)
    return TestClient(app), jobs


def body(webui, name="api", **changes):
    values = dict(dataset_dir=str(webui.dataset), output_name=name, resolution=64, steps=4, batch_size=2,
                  learning_rate=1e-3, rank=4, alpha=4, save_every=0)
    values.update(changes)
    return values


def wait_done(client, jobs):
    jobs.wait(TIMEOUT)
    deadline = time.time() + TIMEOUT
    while True:
        status = client.get(PREFIX).json()
        if status["state"] != "running" or time.time() > deadline:
            return status
        time.sleep(0.05)


def test_start_status_interrupt_resume_and_409(webui, api):
    client, jobs = api
    assert client.get(PREFIX).json()["state"] == "idle"
    with webui.queue_lock:  # a generation is running: the job is accepted and waits for the lock
        started = client.post(PREFIX, json=body(webui))
        assert started.status_code == 200, started.text
        assert started.json()["state"] == "running" and started.json()["total"] == 4
        again = client.post(PREFIX, json=body(webui, "other"))
        assert again.status_code == 409 and "already running" in again.json()["detail"]
        assert client.post(f"{PREFIX}/resume", json=body(webui, "other")).status_code == 409
        assert client.post(f"{PREFIX}/interrupt").json()["state"] == "running"
    stopped = wait_done(client, jobs)
    assert stopped["state"] == "interrupted" and stopped["step"] == 0

    assert client.post(PREFIX, json=body(webui)).status_code == 200
    finished = wait_done(client, jobs)
    assert finished["state"] == "finished" and finished["step"] == 4 and len(finished["losses"]) == 4
    assert finished["output"].endswith("api.safetensors") and finished["error"] is None
    assert finished["eta"] is None and finished["log"]

    resumed = client.post(f"{PREFIX}/resume", json=body(webui, steps=6))
    assert resumed.status_code == 200, resumed.text
    done = wait_done(client, jobs)
    assert done["state"] == "finished" and done["step"] == 6 and len(done["losses"]) == 2


@pytest.mark.parametrize("payload, status, words", [
    ({"output_name": "x"}, 422, "missing required field(s): dataset_dir"),
    ({"dataset_dir": "d", "output_name": "x", "stpes": 10}, 422, "unknown field(s) 'stpes'"),
    ({"dataset_dir": "d", "output_name": "x", "steps": "ten"}, 422, "steps must be an integer, got 'ten'"),
    ({"dataset_dir": "d", "output_name": "x", "steps": 0}, 422, "steps must be an integer in 1..10000000; got 0"),
    ({"dataset_dir": "d", "output_name": "x", "resolution": 500}, 422, "resolution must be a multiple of 64"),
    ({"dataset_dir": "d", "output_name": "x", "optimizer": "sgd"}, 422, "optimizer must be one of adamw, adamw8bit"),
    ({"dataset_dir": "d", "output_name": "../x"}, 422, "output name must be a plain file name"),
    ({"dataset_dir": "d", "output_name": "a\u0000b"}, 422, "without a folder, control characters"),
    ({"dataset_dir": "d", "output_name": "tab\there"}, 422, "got 'tab\\there'"),
    ({"dataset_dir": "d", "output_name": "x" * 121}, 422, "at most 120 characters"),
    ({"dataset_dir": "d", "output_name": "x", "train_text_encoder": "yes"}, 422, "train_text_encoder must be true or false"),
])
def test_malformed_requests_get_a_clear_422(webui, api, payload, status, words):
    client, jobs = api
    response = client.post(PREFIX, json=payload)
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert jobs.status().state.value == "idle"


BAD_ADAPTER_FIELDS = [
    ({"method": "t2i_adapter", "t2i_condition_channels": 2},
     "t2i_condition_channels: condition channels must be 1 (edges, sketches) or 3 (RGB maps); got 2"),
    ({"method": "t2i_adapter", "t2i_condition": "depth map"},
     "t2i_condition: the condition name is used in file names"),
    ({"method": "t2i_adapter", "t2i_adapter_kind": "style"},
     "t2i_adapter_kind: adapter_kind must be one of full, light"),
    ({"method": "t2i_adapter", "t2i_num_res_blocks": 1.5}, "t2i_num_res_blocks must be an integer or null, got 1.5"),
    ({"method": "ip_adapter", "ip_projection": "full-face"},
     "ip_projection: projection must be one of plain, plus, faceid"),
    ({"method": "ip_adapter", "ip_lora_rank": -1}, "ip_lora_rank: lora_rank must be an integer in 0..1024"),
    ({"method": "ip_adapter", "ip_face_pack": "../buffalo_l"}, "ip_face_pack: the face model pack is a folder name"),
    ({"method": "ip_adapter", "ip_resampler_depth": 0},
     "ip_resampler_depth: resampler_depth must be an integer in 1..16"),
    ({"method": "ip_adapter", "ip_image_drop": 0.6, "ip_text_drop": 0.6},
     "IP-Adapter settings: image/text/both drop rates must be in [0, 1] and sum to at most 1"),
    ({"method": "ip_adapter", "save_precision": "int8"}, "save_precision must be one of fp32, fp16, bf16; got 'int8'"),
    ({"method": "t2i_adapter", "rank": 4}, "method t2i_adapter does not take rank (LoRA); remove it"),
    ({"ip_projection": "plus", "t2i_condition": "canny"},
     "method lora does not take ip_projection (IP-Adapter), t2i_condition (T2I-Adapter); remove them"),
    ({"method": "controlnet"}, "method must be one of lora, t2i_adapter, ip_adapter; got 'controlnet'"),
]


@pytest.mark.parametrize("fields, words", BAD_ADAPTER_FIELDS, ids=[str(i) for i in range(len(BAD_ADAPTER_FIELDS))])
def test_a_bad_method_field_gets_a_422_naming_it(webui, api, fields, words):
    client, jobs = api
    response = client.post(PREFIX, json={"dataset_dir": str(webui.dataset), "output_name": "x", **fields})
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert jobs.status().state.value == "idle"


def test_a_bad_sample_image_is_refused_before_the_run(webui, api, tmp_path):
    client, jobs = api
    base = {"dataset_dir": str(webui.dataset), "output_name": "x"}
    response = client.post(PREFIX, json={**base, "sample_image": str(webui.dataset / "a.png")})
    assert response.status_code == 422 and "LoRA samples take none" in response.json()["detail"], response.text
    missing = tmp_path / "nope.png"
    response = client.post(PREFIX, json={**base, "method": "ip_adapter", "sample_image": str(missing)})
    assert response.status_code == 400, response.text
    assert f"the sample image {missing} does not exist" in response.json()["detail"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    response = client.post(PREFIX, json={**base, "method": "t2i_adapter", "sample_image": str(broken)})
    assert response.status_code == 400 and "is not an image PIL can read" in response.json()["detail"], response.text
    assert jobs.status().state.value == "idle"


def test_t2i_and_ip_jobs_start_and_report_through_the_api(webui, api):
    from fixtures.clip import save_clip_vision, tiny_clip_vision
    client, jobs = api
    encoder = save_clip_vision(tiny_clip_vision(), webui.root / "models" / "clip_vision")
    adapters = webui.root / "models" / "adapters"
    ip = dict(body(webui, "ip_api", method="ip_adapter", ip_image_encoder=encoder.name, ip_projection="plain"),
              rank=16, alpha=16.0)  # another method's knobs at their defaults are accepted (a tab sends them all)
    started = client.post(PREFIX, json=ip)
    assert started.status_code == 200, started.text
    assert started.json()["method"] == "ip_adapter" and started.json()["total"] == 4
    done = wait_done(client, jobs)
    assert done["state"] == "finished" and done["step"] == 4 and len(done["losses"]) == 4, done["error"]
    assert done["output"] == str(adapters / "ip_api.safetensors")

    for image in (webui.dataset / "2_shapes").glob("*.png"):
        (image.with_name(f"{image.stem}.sketch.png")).write_bytes(image.read_bytes())
    t2i = {k: v for k, v in body(webui, "t2i_api", method="t2i_adapter").items() if k not in ("rank", "alpha")}
    t2i.update(t2i_condition="sketch", t2i_condition_channels=1, t2i_export_layout="diffusers")
    started = client.post(PREFIX, json=t2i)
    assert started.status_code == 200, started.text
    done = wait_done(client, jobs)
    assert done["state"] == "finished" and done["method"] == "t2i_adapter", done["error"]
    assert done["output"] == str(adapters / "t2i_api.safetensors")
    assert sorted(p.name for p in adapters.iterdir()) == ["ip_api.safetensors", "t2i_api.safetensors"]

    missing = client.post(PREFIX, json=dict(ip, output_name="again", ip_image_encoder="nope.safetensors"))
    assert missing.status_code == 400 and "ip_image_encoder: no CLIP vision encoder 'nope.safetensors'" in \
        missing.json()["detail"]


def test_impossible_requests_get_a_clear_400_and_non_objects_a_422(webui, api, tmp_path):
    client, jobs = api
    missing = client.post(PREFIX, json=body(webui, dataset_dir=str(tmp_path / "nowhere")))
    assert missing.status_code == 400 and "nowhere" in missing.json()["detail"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert client.post(PREFIX, json=body(webui, dataset_dir=str(empty))).status_code == 400
    no_checkpoint = client.post(f"{PREFIX}/resume", json=body(webui, "never"))
    assert no_checkpoint.status_code == 400 and "no checkpoint of 'never'" in no_checkpoint.json()["detail"]
    assert client.post(PREFIX, content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post(PREFIX, json=[1, 2]).status_code == 422
    assert client.post(PREFIX).status_code == 422
    assert jobs.status().state.value == "idle"


def test_the_routes_use_the_webuis_api_auth_and_are_documented(webui, monkeypatch):
    from modules import shared
    monkeypatch.setattr(shared.cmd_opts, "api_auth", "alice:secret,bob:pw", raising=False)
    app = FastAPI()
    register_api(app, TrainingJobs(TrainingHost()))
    client = TestClient(app)
    assert client.get(PREFIX).status_code == 401
    assert client.get(PREFIX, auth=("alice", "wrong")).status_code == 401
    assert client.get(PREFIX, auth=("bob", "pw")).json()["state"] == "idle"
    schema = client.get("/openapi.json").json()
    start = schema["paths"][PREFIX]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"dataset_dir", "output_name", "steps", "rank", "t2i_condition", "ip_projection"} <= set(start["properties"])
    assert start["properties"]["t2i_num_res_blocks"]["type"] == "integer"
    assert set(schema["paths"]) == {PREFIX, f"{PREFIX}/interrupt", f"{PREFIX}/resume"}


def _entry_point():
    """scripts/adapters_train.py executed as the WebUI's script loader does (its own module)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("adapters_train_api_test",
                                                  Path(__file__).resolve().parents[2] / "scripts" / "adapters_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(monkeypatch, **values):
    from modules import shared
    for name in ("api", "nowebui", "api_auth", "gradio_auth", "gradio_auth_path"):
        monkeypatch.setattr(shared.cmd_opts, name, values.get(name, False if name in ("api", "nowebui") else None))


def _served(module) -> TestClient:
    app = FastAPI()
    module.on_app_started(None, app)
    return TestClient(app)


def test_the_routes_exist_only_when_the_webui_serves_its_api(webui, monkeypatch, capsys):
    from lib_adapters.webui.training.api import OFF_NOTICE
    module = _entry_point()
    _flags(monkeypatch)
    assert _served(module).get(PREFIX).status_code == 404
    assert module._jobs is None  # no job manager made for routes that do not exist
    out = capsys.readouterr().out
    assert out.count(OFF_NOTICE) == 1 and "--api" in OFF_NOTICE and "Train Adapter tab works" in OFF_NOTICE
    _flags(monkeypatch, api=True)
    assert _served(module).get(PREFIX).json()["state"] == "idle"
    _flags(monkeypatch, nowebui=True)  # webui.py's api_only(): the API without the UI
    assert _served(module).post(PREFIX, json={"output_name": "x"}).status_code == 422
    assert OFF_NOTICE not in capsys.readouterr().out


def test_the_ui_login_protects_the_routes_when_there_is_no_api_auth(webui, monkeypatch, tmp_path):
    module = _entry_point()
    _flags(monkeypatch, api=True, gradio_auth="alice:secret, carol:c:olon")
    client = _served(module)
    assert client.get(PREFIX).status_code == 401
    assert client.post(PREFIX, json=body(webui)).status_code == 401  # nothing starts without credentials
    assert client.get(PREFIX, auth=("alice", "wrong")).status_code == 401
    assert client.get(PREFIX, auth=("alice", "secret")).status_code == 200
    assert client.get(PREFIX, auth=("carol", "c:olon")).status_code == 200
    assert module.jobs().status().state.value == "idle"

    auth_file = tmp_path / "auth.txt"
    auth_file.write_text("bob:pw,eve:x\n\n  dave:d  \n", encoding="utf8")  # the format get_gradio_auth_creds reads
    _flags(monkeypatch, api=True, gradio_auth_path=str(auth_file))
    client = _served(module)
    assert [client.get(PREFIX, auth=a).status_code for a in (("bob", "pw"), ("dave", "d"), ("alice", "secret"))] == \
        [200, 200, 401]
    _flags(monkeypatch, api=True, gradio_auth_path=str(tmp_path / "missing.txt"))
    assert _served(module).get(PREFIX, auth=("bob", "pw")).status_code == 401  # unreadable: closed to everyone

    _flags(monkeypatch, api=True, api_auth="api:key", gradio_auth="alice:secret")  # --api-auth wins, as for /sdapi
    client = _served(module)
    assert client.get(PREFIX, auth=("alice", "secret")).status_code == 401
    assert client.get(PREFIX, auth=("api", "key")).status_code == 200


def _snapshot(folder):
    """Every entry under ``folder``: kind, size, modification time and content hash."""
    import hashlib
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (digest, stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def test_runs_never_write_into_the_dataset_folder(webui, api, monkeypatch):
    """Generated T2I conditions, latents and CLIP features go under outputs/adapters-training/cache/<dataset>-<hash>."""
    from fixtures.clip import save_clip_vision, tiny_clip_vision
    from lib_adapters.webui.training.host import TrainingHost
    client, jobs = api
    encoder = save_clip_vision(tiny_clip_vision(), webui.root / "models" / "clip_vision")
    before = _snapshot(webui.dataset)
    t2i = {k: v for k, v in body(webui, "edges", method="t2i_adapter", steps=2, cache_latents=True).items()
           if k not in ("rank", "alpha")}
    t2i.update(t2i_condition="canny", t2i_condition_channels=1, t2i_preprocessor="canny")
    assert client.post(PREFIX, json=t2i).status_code == 200
    assert wait_done(client, jobs)["state"] == "finished"
    ip = {k: v for k, v in body(webui, "ip_cache", method="ip_adapter", steps=2, cache_latents=True).items()
          if k not in ("rank", "alpha")}
    ip.update(ip_image_encoder=encoder.name)
    assert client.post(PREFIX, json=ip).status_code == 200
    assert wait_done(client, jobs)["state"] == "finished"
    assert _snapshot(webui.dataset) == before  # byte for byte, listing and modification times

    caches = list((TrainingHost().work_dir() / "cache").iterdir())
    assert [c.name.rsplit("-", 1)[0] for c in caches] == [webui.dataset.name]
    assert sorted(p.name for p in (caches[0] / "t2i-conditions" / "canny").rglob("*.png")) == \
        [f"{i}.canny.png" for i in range(4)]
    assert any((caches[0] / "latents").iterdir()) and any((caches[0] / "clip-features").iterdir())


def test_error_answers_name_dataset_files_but_never_list_or_read_back_other_folders(webui, api, tmp_path):
    client, jobs = api
    private = tmp_path / "private"
    for name in ("alpha_secret", "beta_secret"):
        (private / name).mkdir(parents=True)
        (private / name / "notes.md").write_text("password: hunter2")
    answer = client.post(PREFIX, json=body(webui, dataset_dir=str(private)))
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert f"{private}: empty folder (no images" in detail and "in it or in its sub-folders" in detail
    assert "secret" not in detail.replace(str(private), "") and "notes" not in detail

    letter = tmp_path / "letter.txt"  # any .txt file is taken as a TencentARC meta file by a T2I run
    letter.write_text("Dear Bob,\nthe password is hunter2\n")
    t2i = {k: v for k, v in body(webui, method="t2i_adapter", dataset_dir=str(letter)).items()
           if k not in ("rank", "alpha")}
    answer = client.post(PREFIX, json=t2i)
    assert answer.status_code == 400 and "no line of it is an image path" in answer.json()["detail"], answer.text
    assert "hunter2" not in answer.json()["detail"] and "Dear" not in answer.json()["detail"]
    letter.write_text(f"{webui.dataset / '2_shapes' / '0.png'}\nthe password is hunter2\n")
    detail = client.post(PREFIX, json=t2i).json()["detail"]
    assert "letter.txt: missing image (line 2 is not an image path)" in detail and "hunter2" not in detail, detail
    assert jobs.status().state.value == "idle"


def _lora_file(path):
    from lib_adapters.training.methods.lora_file import save_lora
    import torch
    save_lora(path, {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4),
                     "lora_unet_a.alpha": torch.tensor(4.0)}, {})
    return path


def test_named_files_that_are_unreadable_or_of_another_family_get_a_400_before_anything_starts(webui, api, tmp_path):
    from safetensors.torch import save_file

    from fixtures.ip import random_ip_state_dict
    from fixtures.clip import save_clip_vision, tiny_clip_vision
    from lib_adapters.models.t2i_adapter import SpatialAdapterConfig, T2IKind, build_adapter
    from lib_adapters.unet.layout import bind_layout
    client, jobs = api
    save_clip_vision(tiny_clip_vision(), webui.root / "models" / "clip_vision")  # the default encoder is there
    lora = _lora_file(tmp_path / "a_lora.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    adapter = build_adapter(SpatialAdapterConfig(T2IKind.FULL, in_channels=64, channels=(32, 64, 128, 128),
                                                 num_res_blocks=2, unshuffle=8))  # canny (1 channel) for the tiny UNet
    t2i_file = tmp_path / "t2i.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(t2i_file))
    plus = tmp_path / "plus.safetensors"
    nested = random_ip_state_dict(bind_layout(webui.model.model.diffusion_model), "plus", 32)
    save_file({f"{part}.{k}": v for part, sd in nested.items() for k, v in sd.items()}, str(plus))
    encoder = save_clip_vision(tiny_clip_vision(), tmp_path / "clip")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(encoder.read_bytes()[:-1000])
    t2i = {k: v for k, v in body(webui, method="t2i_adapter").items() if k not in ("rank", "alpha")}
    t2i.update(t2i_condition="canny", t2i_condition_channels=1, t2i_preprocessor="canny")
    ip = {k: v for k, v in body(webui, method="ip_adapter").items() if k not in ("rank", "alpha")}
    cases = [
        (dict(t2i, t2i_init_from=str(lora)), f"t2i_init_from: {lora} cannot be used", "LoRA file, not a T2I-Adapter"),
        (dict(t2i, t2i_init_from=str(broken)), f"t2i_init_from: {broken} cannot be used", "damaged or incomplete"),
        (dict(ip, ip_init_from=str(t2i_file)), f"ip_init_from: {t2i_file} cannot be used",
         "T2I-Adapter file, not an IP-Adapter"),
        (dict(ip, ip_init_from=str(plus)), f"ip_init_from: {plus} holds a plus IP-Adapter", "ip_projection is plain"),
        (dict(ip, ip_image_encoder=str(lora)), f"ip_image_encoder: {lora} cannot be used",
         "it holds a LoRA file, not a CLIP vision encoder"),
        (dict(ip, ip_image_encoder=str(cut)), f"ip_image_encoder: {cut} cannot be used", "damaged or incomplete"),
        (dict(ip, ip_image_encoder=str(t2i_file)), f"ip_image_encoder: {t2i_file} cannot be used",
         "it holds a T2I-Adapter file"),
    ]
    for payload, where, what in cases:
        answer = client.post(PREFIX, json=payload)
        assert answer.status_code == 400, answer.text
        assert where in answer.json()["detail"] and what in answer.json()["detail"], answer.text
        assert jobs.status().state.value == "idle"
    for payload, field in ((dict(t2i, t2i_init_from=str(t2i_file)), "t2i_init_from"),
                           (dict(ip, ip_init_from=str(plus), ip_projection="plus"), "ip_init_from")):
        started = client.post(PREFIX, json=dict(payload, steps=1, output_name=f"ok_{field}"))  # the right family
        assert started.status_code == 200, (field, started.text)
        assert wait_done(client, jobs)["state"] == "finished", field


def test_a_bad_output_name_is_refused_in_the_tab(webui):
    from lib_adapters.training.request import TrainRequest
    from lib_adapters.webui.training.tab import TrainTab
    from lib_adapters.webui.training.view import all_fields
    jobs = TrainingJobs(TrainingHost())
    tab = TrainTab(lambda: jobs, poll_seconds=0)
    values = {**TrainRequest.defaults(), "dataset_dir": str(webui.dataset), "sample_prompts": "", "sample_every": 0}
    for name, words in (("a\x00b", "control characters"), ("n" * 121, "at most 120 characters")):
        (out,) = list(tab.start("", "LoRA", *[{**values, "output_name": name}[f] for f in all_fields()]))
        assert "output name must be a plain file name" in out[4]["value"] and words in out[4]["value"], out[4]
    assert jobs.status().state.value == "idle"


def test_an_api_body_is_a_command_line_config_file_unchanged(webui, api, tmp_path):
    """One schema: the body ``POST /adapters/v1/train`` accepts, written to a file, is accepted unchanged by
    ``python -m lib_adapters.training --config body.json`` (the model and output folder from flags; no --checkpoint:
    the built-in tiny model), and both runs train what it says."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from lib_adapters.training.methods.lora_file import load_lora

    client, jobs = api
    payload = {"method": "lora", "dataset_dir": str(webui.dataset), "output_name": "one_schema", "resolution": 64,
               "steps": 2, "batch_size": 2, "learning_rate": 1e-3, "lr_schedule": "cosine", "rank": 4, "alpha": 2,
               "lora_targets": "attention+ff", "train_text_encoder": False, "save_every": 1, "seed": 3,
               "precision": "auto", "save_precision": "fp32", "sample_prompts": [], "sample_image": "",
               "min_snr_gamma": None, "t2i_condition": "depth", "ip_projection": "plain", "overwrite": False}
    started = client.post(PREFIX, json=payload)
    assert started.status_code == 200, started.text
    done = wait_done(client, jobs)
    assert done["state"] == "finished", done["error"]

    body = tmp_path / "body.json"
    body.write_text(json.dumps(payload))
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "lib_adapters.training", "--config", str(body), "--output-dir",
                           str(tmp_path / "cli"), "--device", "cpu"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (api_tensors, api_meta), (cli_tensors, cli_meta) = load_lora(done["output"]), load_lora(
        tmp_path / "cli" / "one_schema.safetensors")
    # the tiny ldm model (WebUI) and the tiny diffusers model (CLI) share SD1's structure: the same LoRA, key for key
    assert api_tensors.keys() == cli_tensors.keys() and len(api_tensors) > 30
    assert {t.dtype for t in cli_tensors.values()} == {t.dtype for t in api_tensors.values()} == {torch.float32}
    for key, value in (("ss_network_dim", "4"), ("ss_network_alpha", "2.0"), ("ss_steps", "2"), ("ss_seed", "3"),
                       ("ss_lr_scheduler", "cosine"), ("ss_learning_rate", "0.001"), ("ss_mixed_precision", "no"),
                       ("ss_network_args", '{"targets": "attention+ff"}')):
        assert api_meta[key] == cli_meta[key] == value, key
    assert sorted(p.name for p in (tmp_path / "cli" / "one_schema-checkpoints").iterdir()) == [
        f"one_schema-step00000{i}{s}" for i in (1, 2) for s in (".safetensors", ".state")]  # save_every 1

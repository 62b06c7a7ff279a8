"""IP-Adapter FaceID training through the web API in the stub WebUI, as a client meets it: without insightface's
pack in models/insightface/models a request is a 400 naming the pack's files and the folder (and the models'
licence); a dataset image without a face ends the job failed naming it, before any step; a run with samples publishes
a FaceID file to models/adapters that the panel's loader reads as FaceID, and that an Adapters unit uses in the very
next generation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from face.face_pack import face_image, write_pack
from lib_adapters.webui.training.api import PREFIX
from webui_train.test_train_api import api, wait_done  # noqa: F401  (api: the fixture, used by name)

FACEID = dict(method="ip_adapter", ip_projection="faceid", ip_lora_rank=4, resolution=64, steps=2, batch_size=2,
              learning_rate=1e-3, save_every=0)


def _faces(folder: Path, seeds=(1, 2, 3), faceless=()) -> Path:
    """Photos of one "person" (tests/face's controlled faces) with captions; ``faceless``: names without a face."""
    folder.mkdir(parents=True)
    for seed in seeds:
        Image.fromarray(face_image(seed)).save(folder / f"{seed}.png")
    for name in faceless:
        Image.fromarray(face_image(7, big=None)).save(folder / f"{name}.png")
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text("a portrait of me")
    return folder


def test_a_faceid_request_without_the_face_models_is_a_400_naming_the_files_and_the_folder(webui, api, tmp_path):
    client, jobs = api
    dataset = _faces(tmp_path / "me")
    packs = webui.root / "models" / "insightface" / "models"
    for pack, files in (("buffalo_l", ("det_10g.onnx", "w600k_r50.onnx")),
                        ("antelopev2", ("scrfd_10g_bnkps.onnx", "glintr100.onnx"))):
        answer = client.post(PREFIX, json=dict(FACEID, dataset_dir=str(dataset), output_name="me", ip_face_pack=pack))
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert all(name in detail for name in files) and str(packs / pack) in detail, detail
        assert "non-commercial" in detail
    write_pack(webui.root / "models")  # buffalo_l only: a detector and a recognizer are both needed
    (packs / "antelopev2").mkdir()
    (packs / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes((packs / "buffalo_l" / "det_10g.onnx").read_bytes())
    answer = client.post(PREFIX, json=dict(FACEID, dataset_dir=str(dataset), output_name="me",
                                           ip_face_pack="antelopev2"))
    assert answer.status_code == 400 and "no face recognizer found" in answer.json()["detail"], answer.text
    assert "glintr100.onnx" in answer.json()["detail"]
    assert jobs.status().state.value == "idle" and not (webui.root / "models" / "adapters" / "me.safetensors").exists()


def test_an_image_without_a_face_ends_the_job_before_its_first_step_naming_it(webui, api, tmp_path):
    client, jobs = api
    write_pack(webui.root / "models")
    dataset = _faces(tmp_path / "me", faceless=("back", "landscape"))
    started = client.post(PREFIX, json=dict(FACEID, dataset_dir=str(dataset), output_name="me"))
    assert started.status_code == 200, started.text  # the faces are analysed by the run (minutes for big datasets)
    done = wait_done(client, jobs)
    assert done["state"] == "failed" and done["step"] == 0 and done["losses"] == [], done
    for name in ("back.png", "landscape.png"):
        assert f"{name}: no face (no face was found, and FaceID learns from the face" in done["error"]
    assert "1.png" not in done["error"] and done["output"] is None


@pytest.fixture
def panel(webui):
    """The Adapters panel's script in the same stub WebUI (as tests/test_panel_faceid_e2e.py sets it up)."""
    import driver
    import lib_adapters.webui.panel as panel_package
    from test_panel_e2e import _load_script_module

    module = _load_script_module()
    module.release_resources()
    panel_package._resources = None
    driver.build_runners([module.AdaptersScript])
    yield driver
    module.release_resources()


def test_a_faceid_run_with_samples_is_a_faceid_the_panel_uses_in_the_next_generation(webui, api, panel, tmp_path):
    from lib_adapters.formats.faceid import load_faceid_adapter
    from lib_adapters.formats.reader import read_safetensors_metadata
    from lib_adapters.models.faceid import FaceIDVariant

    client, jobs = api
    write_pack(webui.root / "models")
    dataset = _faces(tmp_path / "me")
    request = dict(FACEID, dataset_dir=str(dataset), output_name="me_faceid", sample_every=2, sample_steps=2,
                   sample_prompts=["a portrait of me"])  # the sample's face: the dataset's first image
    started = client.post(PREFIX, json=request)
    assert started.status_code == 200, started.text
    done = wait_done(client, jobs)
    assert done["state"] == "finished" and done["step"] == 2, done["error"]
    output = webui.root / "models" / "adapters" / "me_faceid.safetensors"
    assert done["output"] == str(output) and len(done["samples"]) == 1 and Path(done["samples"][0]).is_file()
    loaded = load_faceid_adapter(output)
    assert loaded.variant is FaceIDVariant.FACEID and {lora.rank for lora in loaded.lora.values()} == {4}
    metadata = read_safetensors_metadata(output)
    assert (metadata["ip_projection"], metadata["face_models"], metadata["ip_lora_rank"]) == (
        "faceid", "buffalo_l", "4")

    # the very next generation: an Adapters unit selects it by its name, with a photo of the face
    base = panel.txt2img()
    unit = {"enabled": True, "model": "me_faceid", "image": face_image(1), "weight": 1.0}
    result = panel.txt2img(alwayson_scripts={"Adapters": [unit]})
    assert "skipped" not in result.comments, result.comments
    difference = np.abs(np.asarray(base.images[0], np.int16) - np.asarray(result.images[0], np.int16)).mean()
    assert difference > 0.1, difference
    assert "Model: me_faceid" in result.infotexts[0] and "Face: largest" in result.infotexts[0]

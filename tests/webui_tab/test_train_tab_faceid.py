"""The Train Adapter tab's IP-Adapter FaceID, as a user meets it in the stub WebUI: faceid among the projections, its
face model pack (listed from models/insightface/models) and attention LoRA rank shown only while it is chosen (the
CLIP encoder box, which FaceID does not read, hidden then), the request they make; a run with the pack missing
reported in the tab naming the files and the folder; a run whose file the IP lists then offer, which the panel's
loaders read as FaceID, and which a second run fine-tunes by its listed name."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

import driver
from face.face_pack import face_image, write_pack
from lib_adapters.training.request import TrainRequest
from lib_adapters.webui.training.tab import TrainTab
from lib_adapters.webui.training.view import all_fields, build_request


def _values(tab: TrainTab, **changes) -> dict:
    """Every widget's value as the tab sends it, with ``changes``."""
    return {**{name: tab.inputs[name].value for name in all_fields()}, "sample_every": 0, **changes}


def _args(tab: TrainTab, **changes) -> list:
    values = _values(tab, **changes)
    return [values[name] for name in all_fields()]


def _handler(blocks: gr.Blocks, widget, trigger: str):
    """(fn, outputs) of the event ``trigger`` of ``widget`` in ``blocks``, as gradio wired it."""
    by_id = {block._id: block for block in blocks.blocks.values()}
    for dependency, fn in zip(blocks.dependencies, blocks.fns):
        if widget._id in dependency["targets"] and dependency["trigger"] == trigger:
            return fn.fn, [by_id[i] for i in dependency["outputs"]]
    raise AssertionError(f"no {trigger} handler on {widget.elem_id}")


def _inside(block, group) -> bool:
    while block is not None:
        if block is group:
            return True
        block = block.parent
    return False


def _models(tmp_path: Path) -> Path:
    from modules import paths

    driver.reset_webui(tmp_path / "webui")
    return Path(paths.models_path)


def test_faceid_is_a_projection_whose_pack_and_rank_show_only_while_it_is_chosen(tmp_path):
    from lib_adapters.webui.training.host import TrainingHost
    from lib_adapters.webui.training.knobs import face_pack_choices

    models = _models(tmp_path)
    write_pack(models, "antelopev2")
    tab = TrainTab(lambda: None)
    blocks = tab.build()
    projection, pack, rank = (tab.inputs[n] for n in ("ip_projection", "ip_face_pack", "ip_lora_rank"))
    encoder = tab.inputs["ip_image_encoder"]
    assert projection.choices == ["plain", "plus", "faceid"] and projection.value == "plain"
    # the default pack first (its folder may not be there yet: a run then says where it goes), then those found
    assert pack.choices == ["buffalo_l", "antelopev2"] and pack.value == "buffalo_l"
    assert rank.value == 128 and (rank.minimum, rank.maximum) == (0, 256)  # the reference's rank; 0: no LoRA
    fn, outputs = _handler(blocks, projection, "change")
    row = outputs[0]
    assert outputs == [row, encoder] and _inside(pack, row) and _inside(rank, row)
    assert row.visible is False and encoder.visible is True  # plain, the default
    assert all(_inside(w, tab.method_groups["ip_adapter"][0]) for w in (row, encoder))  # hidden for other methods
    assert fn("faceid") == (gr.update(visible=True), gr.update(visible=False))
    assert fn("plus") == fn("plain") == (gr.update(visible=False), gr.update(visible=True))
    write_pack(models, "buffalo_l")
    write_pack(models, "my_pack")
    assert face_pack_choices() == ["buffalo_l", "antelopev2", "my_pack"]  # what 🔄 sends (a pack added meanwhile)

    values = _values(tab, dataset_dir="/data/me", output_name="me", ip_projection="faceid", ip_face_pack="antelopev2",
                     ip_lora_rank=64.0, t2i_condition="canny", rank=4.0)  # other methods' widgets are not sent
    request, _ = build_request("IP-Adapter", values)
    assert (request.method, request.ip_projection, request.ip_face_pack, request.ip_lora_rank) == (
        "ip_adapter", "faceid", "antelopev2", 64) and type(request.ip_lora_rank) is int
    assert TrainRequest.from_dict(request.to_dict()) == request  # what the job manager and the API take
    config = request.to_config(tmp_path / "out", places=TrainingHost().places("ip_adapter"))
    assert config.ip.faceid and (config.ip.face_pack, config.ip.lora_rank) == ("antelopev2", 64)
    assert config.ip.face_models == models / "insightface" / "models"  # where the WebUI keeps insightface's packs


@pytest.fixture
def face_dataset(tmp_path) -> Path:
    folder = tmp_path / "faces" / "1_me"
    folder.mkdir(parents=True)
    for seed in range(3):
        path = folder / f"{seed}.png"
        Image.fromarray(face_image(seed)).save(path)
        path.with_suffix(".txt").write_text("a portrait of me")
    return folder.parent


def test_a_faceid_run_from_the_tab_is_offered_loaded_as_faceid_and_fine_tuned(tmp_path, face_dataset):
    from lib_adapters.catalog import ModelCatalog
    from lib_adapters.formats.adapter_file import load_adapter
    from lib_adapters.formats.detect import ModelFamily
    from lib_adapters.formats.faceid import load_faceid_adapter
    from lib_adapters.formats.reader import read_safetensors_metadata
    from lib_adapters.models.faceid import FaceIDVariant
    from lib_adapters.unet.layout import bind_layout
    from lib_adapters.webui.panel import settings
    from lib_adapters.webui.training.host import TrainingHost
    from lib_adapters.webui.training.jobs import JobState, TrainingJobs
    from lib_adapters.webui.training.knobs import adapter_choices

    models = _models(tmp_path)
    model = driver.load_tiny_model("sd1")
    jobs = TrainingJobs(TrainingHost(work_dir=tmp_path / "work"))
    tab = TrainTab(lambda: jobs, poll_seconds=0.05)
    tab.build()
    faceid = dict(dataset_dir=str(face_dataset), output_name="tab_faceid", resolution=64, steps=2, batch_size=2,
                  save_every=0, ip_projection="faceid", ip_lora_rank=4)

    (out,) = list(tab.start("", "IP-Adapter", *_args(tab, **faceid)))  # no face models yet
    message = out[4]["value"]
    folder = models / "insightface" / "models" / "buffalo_l"
    assert "class='error'" in message and "det_10g.onnx" in message and "w600k_r50.onnx" in message, message
    assert str(folder) in message and "non-commercial" in message
    assert jobs.status().state is JobState.IDLE

    write_pack(models)
    last = list(tab.start("", "IP-Adapter", *_args(tab, **faceid)))[-1]
    status = jobs.wait(120)
    assert status.state is JobState.FINISHED, status.error
    output = models / "adapters" / "tab_faceid.safetensors"
    assert status.output == str(output)
    assert "select <code>tab_faceid</code> as the model of an Adapters unit" in last[4]["value"]
    assert "tab_faceid" in adapter_choices("ip_adapter") and "tab_faceid" not in adapter_choices("t2i_adapter")
    # the panel's loaders: by its listed name through the panel's catalog, a FaceID with its rank-4 attention LoRA
    cfg = settings.current()
    listed = ModelCatalog(cfg.model_dirs, cfg.shared_model_dirs).resolve("tab_faceid")
    assert listed == output and load_adapter(listed).family is ModelFamily.IP_FACEID
    loaded = load_faceid_adapter(listed)
    sites = bind_layout(model.model.diffusion_model).ip_sites()
    assert loaded.variant is FaceIDVariant.FACEID and sorted(loaded.site_hidden) == [s.number for s in sites]
    assert len(loaded.lora) == 2 * len(sites) and {lora.rank for lora in loaded.lora.values()} == {4}

    # fine-tuning it by its listed name; a plain run told to start from it is refused saying what to choose
    tuned = dict(faceid, output_name="tab_faceid2", steps=1, ip_init_from="tab_faceid")
    list(tab.start("", "IP-Adapter", *_args(tab, **tuned)))
    status = jobs.wait(120)
    assert status.state is JobState.FINISHED, status.error
    assert read_safetensors_metadata(Path(status.output))["fine_tuned_from"] == "tab_faceid"
    (out,) = list(tab.start("", "IP-Adapter", *_args(tab, **dict(tuned, ip_projection="plain"))))
    assert "holds an IP-Adapter FaceID" in out[4]["value"] and "choose ip_projection faceid" in out[4]["value"]

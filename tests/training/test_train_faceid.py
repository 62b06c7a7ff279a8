"""IP-Adapter FaceID training: the schema's knobs, each image's face embedding (insightface's pack through our
onnxruntime analysis, the largest face, cached by content and pack, images without a face listed before the first
step), the reference's start (projection, to_k_ip/to_v_ip copies, a zero-started LoRA on every attention), its
image dropout, and short runs that train all three and resume bit for bit."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from train_helpers import ColourFaces, half_colour_image, resumes_bit_for_bit, tiny, use_face_analyzer

from face.face_pack import face_image, write_pack
from face.faceid_weights import faceid_state_dict, flat
from fixtures.ip import random_ip_state_dict
from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.face import FaceAnalyzer, SessionOptions
from lib_adapters.face.discovery import find_pack_models
from lib_adapters.formats.faceid import load_faceid_adapter
from lib_adapters.training.cli_args import build_parser, default_face_models, places_from_args, request_from_args
from lib_adapters.training.config import IPAdapterConfig, TrainConfig
from lib_adapters.training.data import DatasetInvalidError
from lib_adapters.training.face_data import FaceEmbeddings
from lib_adapters.training.job import JobSpec, prepare
from lib_adapters.training.loop import train
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod
from lib_adapters.training.named_files import check_named_files
from lib_adapters.training.request import FilePlaces, TrainRequest
from lib_adapters.training.run_checkpoints import checkpoint_paths
from lib_adapters.unet.layout import bind_layout


def _config(tmp_path: Path, out: str = "out", **kwargs) -> TrainConfig:
    ip = dict(projection="faceid", lora_rank=4)
    ip.update(kwargs.pop("ip", {}))
    defaults = dict(method="ip_adapter", resolution=64, steps=2, batch_size=2, learning_rate=1e-3, seed=3)
    defaults.update(kwargs)
    return TrainConfig(tmp_path / "ds", tmp_path / out, "fid", ip=IPAdapterConfig(**ip), **defaults)


def _colour_dataset(folder: Path, count: int = 4, grey: int = 0) -> list[Path]:
    """``count`` half-colour images (faces for ``ColourFaces``), then ``grey`` grey ones (no face), captioned."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(count)] + [(128, 128, 128)] * grey
    paths = []
    for i, colour in enumerate(colours):
        paths.append(folder / f"{i}.png")
        half_colour_image(colour).save(paths[-1])
        (folder / f"{i}.txt").write_text("a face")
    return paths


def _packs(root: Path, *packs: str) -> Path:
    """A folder of packs (``root/insightface/models``) with each of ``packs`` (default buffalo_l): the controlled
    graphs of tests/face, a blue 32 px square a face."""
    return [write_pack(root, pack) for pack in packs or ("buffalo_l",)][0].parent


def _faces(seed: int = 0, big: bool = True, small: bool = False) -> Image.Image:
    """640x480: a big face on the left and/or a small one on the right, or none."""
    return Image.fromarray(face_image(seed, big=(2, 5) if big else None, small=(60, 10) if small else None))


# -- the schema -----------------------------------------------------------------------------------------------------
def test_faceid_is_a_projection_of_the_schema_with_its_pack_folder_and_lora_rank(tmp_path):
    body = {"dataset_dir": "/data/faces", "output_name": "me", "method": "ip_adapter", "ip_projection": "faceid",
            "ip_face_pack": "antelopev2", "ip_lora_rank": 0}
    config = TrainRequest.from_dict(body).to_config(tmp_path, places=FilePlaces(face_models_dir=tmp_path / "packs"))
    ip = config.ip
    assert ip.faceid and (ip.face_pack, ip.lora_rank, ip.face_models) == ("antelopev2", 0, tmp_path / "packs")
    default = TrainRequest.from_dict({**body, "ip_face_pack": "buffalo_l"}).to_config(tmp_path)
    assert TrainRequest.from_dict({k: v for k, v in body.items() if k != "ip_lora_rank"}).ip_lora_rank == 128
    assert default.ip.face_models is None  # a place: never from a request
    for bad, words in (({"ip_projection": "full-face"}, "plain, plus, faceid"),
                       ({"ip_lora_rank": 2000}, "ip_lora_rank: lora_rank must be an integer in 0..1024"),
                       ({"ip_face_pack": "../x"}, "ip_face_pack: the face model pack is a folder name")):
        with pytest.raises(InputError, match=words):
            TrainRequest.from_dict({**body, **bad}).to_config(tmp_path)
    with pytest.raises(InputError, match="unknown field"):
        TrainRequest.from_dict({**body, "ip_face_models": "/x"})  # where things are is the front end's to say

    args = build_parser().parse_args(["--dataset-dir", "/d", "--output-name", "me", "--method", "ip_adapter",
                                      "--ip-projection", "faceid", "--ip-lora-rank", "64", "--ip-face-pack", "p",
                                      "--ip-face-models", str(tmp_path / "packs")])
    cli = request_from_args(args).to_config(tmp_path, places=places_from_args(args))
    assert (cli.ip.lora_rank, cli.ip.face_pack, cli.ip.face_models) == (64, "p", tmp_path / "packs")


def test_the_command_lines_default_face_models_are_insightfaces_own(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # this checkout is not inside a WebUI's extensions folder
    assert default_face_models() is None
    (tmp_path / ".insightface" / "models").mkdir(parents=True)
    assert default_face_models() == tmp_path / ".insightface" / "models"
    args = build_parser().parse_args(["--dataset-dir", "/d", "--output-name", "me"])
    assert places_from_args(args).face_models_dir == tmp_path / ".insightface" / "models"


def test_missing_face_models_are_refused_before_anything_starts_saying_where_they_go(tmp_path):
    _colour_dataset(tmp_path / "ds")
    with pytest.raises(MissingFileError, match="--ip-face-models DIR") as info:
        prepare(JobSpec(_config(tmp_path), tmp_path / "out"), "cpu")
    assert "non-commercial" in str(info.value)
    empty = _config(tmp_path, ip=dict(face_models=tmp_path / "packs"))
    (tmp_path / "packs" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(MissingFileError, match="det_10g.onnx .* w600k_r50.onnx .*buffalo_l") as info:
        prepare(JobSpec(empty, tmp_path / "out"), "cpu")
    assert "non-commercial" in str(info.value)
    assert not (tmp_path / "out").exists()
    ready = _config(tmp_path, ip=dict(face_models=_packs(tmp_path / "models")))
    assert prepare(JobSpec(ready, tmp_path / "out"), "cpu").config.ip.face_pack == "buffalo_l"


# -- the face embeddings --------------------------------------------------------------------------------------------
def test_images_without_a_face_are_each_named_before_the_first_step(tmp_path):
    folder = tmp_path / "ds" / "1_people"
    folder.mkdir(parents=True)
    for name, image in (("alice", _faces()), ("empty", _faces(big=False)), ("pair", _faces(small=True)),
                        ("wall", _faces(big=False, seed=2))):
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a person")
    config = _config(tmp_path, ip=dict(face_models=_packs(tmp_path / "models")))
    model, backend = tiny("sd1")
    calls = []
    handle = model.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(DatasetInvalidError) as info:
        train(config, backend)
    handle.remove()
    message = str(info.value)
    assert "2 problem(s)" in message and not calls and not (tmp_path / "out" / "fid-checkpoints").exists()
    for name in ("empty", "wall"):
        assert f"1_people/{name}.png: no face (no face was found, and FaceID learns from the face" in message
    assert "alice" not in message and "pair" not in message
    # the analysis is kept: the next attempt, after removing the two, analyses nothing again
    (folder / "empty.png").unlink()
    (folder / "wall.png").unlink()
    faces = FaceEmbeddings(config.ip, config.cache_dir / "face-embeddings")
    assert faces.problems([folder / "alice.png", folder / "pair.png"]) == [] and faces.analysed == 0


def test_the_largest_face_is_used_and_cached_by_content_and_pack(tmp_path):
    packs = _packs(tmp_path / "models", "buffalo_l", "antelopev2")  # the same graphs under two pack names
    pair = tmp_path / "pair.png"
    _faces(small=True).save(pair)
    analyzer = FaceAnalyzer(find_pack_models(packs, "buffalo_l"), SessionOptions(threads=1))
    image = np.asarray(_faces(small=True))
    largest, other = analyzer.analyze(image, index=0), analyzer.analyze(image, index=1)
    assert largest.faces_found == 2 and not np.allclose(largest.normed_embedding, other.normed_embedding)

    ip = IPAdapterConfig(projection="faceid", face_models=packs)
    cache = tmp_path / "cache"
    first = FaceEmbeddings(ip, cache)
    got = first.get([pair])[0]
    assert torch.allclose(got, torch.from_numpy(largest.normed_embedding), atol=1e-6)
    assert first.analysed == 1 and first.record(pair).faces == 2
    again = FaceEmbeddings(ip, cache)
    copy = tmp_path / "copy.png"
    shutil.copy(pair, copy)  # same content under another name: the same entry
    assert torch.equal(again.get([pair, copy]), torch.stack([got, got])) and again.analysed == 0 and again.hits == 2
    assert len(list(cache.glob("*.faceemb"))) == 1
    _faces(small=True, seed=5).save(copy)  # new content
    assert again.get([copy]).shape == (1, 512) and again.analysed == 1
    other_pack = FaceEmbeddings(IPAdapterConfig(projection="faceid", face_models=packs, face_pack="antelopev2"), cache)
    other_pack.get([pair])
    assert other_pack.analysed == 1 and len(list(cache.glob("*.faceemb"))) == 3
    assert torch.equal(first.empty(), torch.zeros(512))


# -- the model and the step -----------------------------------------------------------------------------------------
def _forward(model, x, t, ctx):
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=ctx)


def test_a_new_model_starts_as_the_reference_and_its_lora_acts_in_every_attention(tmp_path, monkeypatch):
    use_face_analyzer(monkeypatch, ColourFaces())
    model, backend = tiny("sd1")
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)
    base = _forward(model, x, t, ctx)
    method = IPAdapterMethod(backend, IPAdapterConfig(projection="faceid", lora_rank=8))
    sites = method.bound.ip_sites()
    state = method.model.state_dict()
    for site in sites:
        attn = unet.get_submodule(site.path)
        assert torch.equal(state[f"ip_adapter.{site.number}.to_k_ip.weight"], attn.to_k.weight)
        assert torch.equal(state[f"ip_adapter.{site.number}.to_v_ip.weight"], attn.to_v.weight)
    lora_keys = [k for k in state if "_lora." in k]
    assert len(lora_keys) == 2 * 4 * 2 * len(sites)  # down and up, q/k/v/out, attn1 and attn2 of each block
    assert all(not state[k].any() for k in lora_keys if k.endswith(".up.weight"))  # up starts at zero...
    downs = torch.cat([state[k].flatten() for k in lora_keys if k.endswith(".down.weight")])
    assert abs(downs.std().item() - 1 / 8) < 0.01  # ...down as the reference's LoRALinearLayer: N(0, 1/rank)
    hooked = [m for m in unet.modules() if isinstance(m, torch.nn.Linear) and m._forward_hooks]
    assert len(hooked) == 4 * 2 * len(sites)
    assert torch.equal(_forward(model, x, t, ctx), base)  # a zero LoRA and no image tokens: the base model
    with torch.no_grad():
        for key, value in method.model.named_parameters():
            if key.endswith("to_q_lora.up.weight") and key.startswith("ip_adapter.0."):  # one self-attention's q
                value.normal_(0, 0.1)
    assert (_forward(model, x, t, ctx) - base).abs().max() > 1e-3  # the LoRA acts without the image too
    method.close()
    assert torch.equal(_forward(model, x, t, ctx), base)
    assert not any(m._forward_hooks for m in unet.modules())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_a_dropped_image_is_the_zero_embedding(tmp_path, monkeypatch):
    use_face_analyzer(monkeypatch, ColourFaces())
    _colour_dataset(tmp_path / "ds")
    seen = []
    original = IPAdapterMethod.image_tokens

    def record(self, features):
        seen.append(features.clone())
        return original(self, features)

    monkeypatch.setattr(IPAdapterMethod, "image_tokens", record)
    train(_config(tmp_path, steps=1, ip=dict(image_drop=1.0, text_drop=0.0, both_drop=0.0)), tiny("sd1")[1])
    assert seen and all(f.shape == (2, 512) and not f.any() for f in seen)
    seen.clear()
    train(_config(tmp_path, "kept", steps=1, ip=dict(image_drop=0.0, text_drop=0.0, both_drop=0.0)), tiny("sd1")[1])
    assert seen and all(torch.allclose(f.norm(dim=1), torch.ones(2)) for f in seen)  # the normed embeddings


def test_a_short_run_trains_projection_key_values_and_lora_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    use_face_analyzer(monkeypatch, ColourFaces())
    _colour_dataset(tmp_path / "ds", count=3)

    def config(out: str, **ip) -> TrainConfig:
        return _config(tmp_path, out, steps=4, noise_offset=0.05, save_precision="fp32",
                       ip=dict(image_drop=0.2, text_drop=0.2, both_drop=0.2, **ip))

    a = resumes_bit_for_bit(config)

    method = IPAdapterMethod(tiny("sd1")[1], IPAdapterConfig(projection="faceid", lora_rank=4))
    start = method.trainable_state()
    method.close()
    assert start.keys() == a.keys()
    changed = {k for k in a if not torch.equal(a[k], start[k])}
    for part in ("image_proj.proj.0.weight", "image_proj.norm.weight", "to_k_ip.weight", "to_v_ip.weight",
                 "to_q_lora.up.weight", "to_out_lora.up.weight", "to_k_lora.down.weight"):
        assert any(part in k for k in changed), part  # every part is trained
    loaded = load_faceid_adapter(tmp_path / "a" / "fid.safetensors")  # the straight run's
    assert loaded.variant.value == "FaceID" and {r.rank for r in loaded.lora.values()} == {4}

    with pytest.raises(InputError, match="ip_lora_rank: 4 -> 8"):
        train(config("b", lora_rank=8), tiny("sd1")[1], resume_from=checkpoint_paths(config("b"), 2)[1])
    plain = train(_config(tmp_path, "none", steps=1, ip=dict(lora_rank=0)), tiny("sd1")[1])
    keys = load_file(str(plain.output)).keys()
    assert not any("_lora." in k for k in keys) and load_faceid_adapter(plain.output).lora == {}


def test_fine_tuning_starts_from_a_faceid_file_of_the_same_rank(tmp_path, monkeypatch):
    use_face_analyzer(monkeypatch, ColourFaces())
    _colour_dataset(tmp_path / "ds", count=2)
    done = train(_config(tmp_path, "a", steps=1, save_precision="fp32"), tiny("sd1")[1])
    _, backend = tiny("sd1")
    tuned = IPAdapterMethod(backend, IPAdapterConfig(projection="faceid", lora_rank=4, init_from=done.output))
    saved = load_file(str(done.output))
    assert tuned.init_name == done.output.stem
    assert all(torch.equal(saved[k], v) for k, v in tuned.trainable_state().items()) and len(saved) == len(
        tuned.trainable_state())
    tuned.close()
    with pytest.raises(InputError, match="holds an attention LoRA of rank 4 but ip_lora_rank is 128"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="faceid", init_from=done.output))
    sites = {s.number: s.hidden for s in bind_layout(backend.unet).ip_sites()}
    portrait = tmp_path / "ip-adapter-faceid-portrait_sd15.safetensors"
    save_file(flat(faceid_state_dict("portrait", sites, 32)), str(portrait))
    with pytest.raises(InputError, match="holds a FaceID Portrait adapter; FaceID training trains plain FaceID only"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="faceid", lora_rank=0, init_from=portrait))
    # a CLIP IP-Adapter for a FaceID run, a FaceID file for a plain one: each says which projection fine-tunes it
    plain = tmp_path / "ip-adapter_sd15.bin"
    torch.save(random_ip_state_dict(bind_layout(backend.unet), "base", 32), plain)
    with pytest.raises(InputError, match="holds a plain IP-Adapter, which reads CLIP image features, but ip_projection "
                                         "is faceid: fine-tune a FaceID file, or start from scratch; to fine-tune it "
                                         "choose ip_projection plain"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="faceid", lora_rank=0, init_from=plain))
    with pytest.raises(InputError, match="holds an IP-Adapter FaceID, which reads a face embedding, but ip_projection "
                                         "is plain; to fine-tune a FaceID file choose ip_projection faceid"):
        check_named_files(_config(tmp_path, ip=dict(projection="plain", init_from=done.output)))

"""The IP-Adapter FaceID family: detected as its own family in every released layout, listed, and built into a
runtime whose tokens are the file's projection of the analysed face (cached like encoder outputs), with the
model's LoRA as weight deltas from the paired file or the adapter file itself.

Faces come from the controlled ONNX pack of tests/face/face_pack.py; FaceID weights from faceid_weights.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from face.face_pack import RECOGNIZER_WEIGHT, face_image, write_pack
from face.faceid_weights import faceid_state_dict, flat, kohya_lora
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import CLIP_HIDDEN, random_ip_state_dict
from fixtures.sessions import build_context
from fixtures.unets import LDM_SD1, build_ldm_unet, to_diffusers_unet
from lib_adapters.catalog import ModelCatalog
from lib_adapters.errors import FormatError, InputError, MissingFileError
from lib_adapters.face import FACEID_PLUS_CROP, FaceAnalyzer, NoFaceError, SessionOptions
from lib_adapters.face.align import align_face
from lib_adapters.formats.adapter_file import load_adapter
from lib_adapters.formats.detect import ModelFamily, detect_family
from lib_adapters.formats.faceid_lora import ldm_layer_name, read_paired_lora
from lib_adapters.inference import faceid
from lib_adapters.inference.faces import FaceAnalyzers, FaceService
from lib_adapters.inference.families import build_runtime, family_for
from lib_adapters.inference.units import AdapterUnit, MultiImage
from lib_adapters.models.clip_vision import CropMode
from lib_adapters.unet.layout import bind_layout
from lib_adapters.unet.points import LowRankDelta, Point
from face.onnx_graphs import arcface_by_hand

CONTEXT = LDM_SD1["context_dim"]
NAMES = {"faceid": "ip-adapter-faceid_sd15", "plus": "ip-adapter-faceid-plusv2_sd15",
         "plus1": "ip-adapter-faceid-plus_sd15", "portrait": "ip-adapter-faceid-portrait_sd15"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faceid")
    write_pack(root)
    unet = build_ldm_unet(LDM_SD1, seed=0)
    bound = bind_layout(unet)
    sites = {s.number: s.hidden for s in bound.ip_sites()}
    adapters = root / "adapters"
    adapters.mkdir()
    nested = {}
    for key, name in NAMES.items():
        variant = "plus" if key.startswith("plus") else key
        nested[key] = faceid_state_dict(variant, sites, CONTEXT, heads=1, clip_dim=CLIP_HIDDEN, seed=3)
        torch.save(nested[key], adapters / f"{name}.bin")
    save_clip_vision(tiny_clip_vision(), root / "clip_vision")
    analyzer = FaceAnalyzer.from_models_dir(root, "buffalo_l", SessionOptions(threads=1))
    return SimpleNamespace(root=root, unet=unet, bound=bound, adapters=adapters, nested=nested, analyzer=analyzer)


def _ctx(world, lora_dirs=(), prompt_loras=frozenset(), ctx=None):
    """A build context with face analysis on the test pack; ``ctx``: reuse its caches (a later generation)."""
    new = build_context(world.unet, [world.root / "clip_vision"])
    if ctx is not None:
        new.models, new.encodings, analyzers = ctx.models, ctx.encodings, ctx.inputs.faces.analyzers
    else:
        analyzers = FaceAnalyzers()
    new.inputs.faces = FaceService(world.root, analyzers, new.encodings)
    new.lora_dirs, new.prompt_loras = tuple(lora_dirs), frozenset(prompt_loras)
    return new


def _build(world, key="faceid", ctx=None, file=None, **unit):
    ctx = ctx or _ctx(world)
    unit = AdapterUnit(enabled=True, model=NAMES[key], image=unit.pop("image", face_image(1)), **unit)
    file = file or world.adapters / f"{NAMES[key]}.bin"
    return build_runtime(ctx, "Adapter 1", unit, file), ctx


# --- detection and listing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", ["faceid", "portrait", "unnorm", "plus"])
def test_every_released_layout_is_the_faceid_family(tmp_path, variant, fmt):
    nested = faceid_state_dict(variant, {1: 16, 3: 16}, 24, heads=1, clip_dim=40)
    path = tmp_path / f"ip-adapter-faceid-{variant}.{fmt}"
    torch.save(nested, path) if fmt == "bin" else save_file(flat(nested), str(path))
    loaded = load_adapter(path)
    assert loaded.family is ModelFamily.IP_FACEID and family_for(loaded.family) is faceid.FAMILY
    assert detect_family(flat(nested))[0] is ModelFamily.IP_FACEID


def test_other_ip_adapters_stay_ip_adapters(world):
    for variant in ("base", "plus", "full"):
        assert detect_family(flat(random_ip_state_dict(world.bound, variant, CONTEXT)))[0] is ModelFamily.IP_ADAPTER


def test_faceid_files_are_listed_and_their_loras_are_not(world, tmp_path):
    own, shared = tmp_path / "adapters", tmp_path / "ControlNet"
    own.mkdir(), shared.mkdir()
    nested = world.nested["faceid"]
    torch.save(nested, own / "ip-adapter-faceid_sd15.bin")
    save_file(flat(nested), str(own / "ip-adapter-faceid-flat_sd15.safetensors"))
    lora = kohya_lora(nested["ip_adapter"], to_diffusers_unet(world.unet, LDM_SD1))
    save_file(lora, str(own / "ip-adapter-faceid_sd15_lora.safetensors"))
    save_file(flat(world.nested["portrait"]), str(shared / "ip-adapter-faceid-portrait_sd15.safetensors"))
    save_file(lora, str(shared / "ip-adapter-faceid_sd15_lora.safetensors"))
    names = ModelCatalog([own], [shared]).refresh()
    assert names == ["ip-adapter-faceid-flat_sd15", "ip-adapter-faceid-portrait_sd15", "ip-adapter-faceid_sd15"]


# --- tokens ----------------------------------------------------------------------------------------------------
def test_tokens_are_the_projection_of_the_analysed_face(world):
    built, _ = _build(world, weight=0.7, start=0.1, end=0.9)
    runtime = built.runtime
    assert isinstance(runtime, faceid.FaceIDUnitRuntime) and runtime.points == {Point.ATTENTION, Point.WEIGHTS}
    assert (runtime.weight, runtime.start, runtime.end) == (0.7, 0.1, 0.9)
    face = world.analyzer.analyze(face_image(1))
    expected = arcface_by_hand(align_face(face_image(1), face.keypoints, 112), RECOGNIZER_WEIGHT)
    assert np.abs(face.embedding - expected).max() < 1e-4  # the pack's recognizer, computed by hand
    adapter = runtime.adapter
    tokens = adapter.tokens(torch.from_numpy(face.normed_embedding)[None])
    assert torch.allclose(runtime.cond_tokens, tokens, atol=1e-6) and runtime.cond_tokens.shape == (1, 4, CONTEXT)
    assert torch.allclose(runtime.uncond_tokens, adapter.tokens(torch.zeros(1, 512)), atol=1e-6)


def test_a_repeated_unit_costs_no_face_analysis_and_no_projection(world, monkeypatch):
    calls = {"analyze": 0, "project": 0}
    real_analyze, real_tokens = FaceAnalyzer.analyze, faceid.LoadedFaceIDAdapter.tokens

    def analyze(self, *args, **kwargs):
        calls["analyze"] += 1
        return real_analyze(self, *args, **kwargs)

    def tokens(self, *args, **kwargs):
        calls["project"] += 1
        return real_tokens(self, *args, **kwargs)

    monkeypatch.setattr(FaceAnalyzer, "analyze", analyze)
    monkeypatch.setattr(faceid.LoadedFaceIDAdapter, "tokens", tokens)
    first, ctx = _build(world, "plus")
    assert calls == {"analyze": 1, "project": 2}  # the face, then its tokens and the "no face" tokens
    again, _ = _build(world, "plus", ctx=_ctx(world, ctx=ctx))
    assert calls == {"analyze": 1, "project": 2} and ctx.inputs.faces.analyzers.loads == 1
    assert torch.equal(first.runtime.cond_tokens, again.runtime.cond_tokens)
    other, _ = _build(world, "plus", ctx=_ctx(world, ctx=ctx), image=face_image(2))
    assert calls == {"analyze": 2, "project": 4} and not torch.equal(other.runtime.cond_tokens,
                                                                   first.runtime.cond_tokens)


def _normed(world, *seeds, index=None):
    return torch.stack([torch.from_numpy(world.analyzer.analyze(face_image(s), index=index).normed_embedding)
                        for s in seeds])


def test_several_photos_average_the_embeddings_or_concatenate_the_tokens(world):
    images = [face_image(1), face_image(2), face_image(3)]
    averaged, _ = _build(world, image=images)
    concatenated, _ = _build(world, image=images, multi_image="Concatenate")
    embeds = _normed(world, 1, 2, 3)
    adapter = averaged.runtime.adapter
    assert torch.allclose(averaged.runtime.cond_tokens, adapter.tokens(embeds.mean(0, keepdim=True)), atol=1e-6)
    assert torch.allclose(concatenated.runtime.cond_tokens, adapter.tokens(embeds).reshape(1, 12, CONTEXT), atol=1e-6)
    assert concatenated.runtime.uncond_tokens.shape == (1, 12, CONTEXT)
    portrait, _ = _build(world, "portrait", image=images)  # Average asked, Portrait concatenates
    assert portrait.runtime.cond_tokens.shape == (1, 48, CONTEXT)
    assert "multi_image" not in portrait.fields and "multi_image" in averaged.fields


def test_plus_reads_the_aligned_crop_through_the_encoder_and_v2_its_structure_weight(world):
    ctx = _ctx(world)
    v2, _ = _build(world, "plus", ctx=ctx, s_scale=0.5)
    face = world.analyzer.analyze(face_image(1), crop_size=FACEID_PLUS_CROP)
    encoder = ctx.reference_encoder(world.root / "clip_vision" / "clip_vision_tiny.safetensors")
    hidden, empty = encoder.ip_outputs([face.aligned_crop], CropMode.CENTER, hidden_states=True)
    adapter = v2.runtime.adapter
    expected = adapter.tokens(torch.from_numpy(face.normed_embedding)[None], hidden, 0.5)
    assert torch.allclose(v2.runtime.cond_tokens, expected, atol=1e-5)
    assert torch.allclose(v2.runtime.uncond_tokens, adapter.tokens(torch.zeros(1, 512), empty, 0.5), atol=1e-5)
    full, _ = _build(world, "plus", ctx=ctx, s_scale=1.0)
    assert not torch.allclose(full.runtime.cond_tokens, v2.runtime.cond_tokens, atol=1e-4)
    assert "s_scale" in v2.fields
    plus1_a, _ = _build(world, "plus1", ctx=ctx, s_scale=0.5)
    plus1_b, _ = _build(world, "plus1", ctx=ctx, s_scale=2.0)
    assert torch.equal(plus1_a.runtime.cond_tokens, plus1_b.runtime.cond_tokens) and "s_scale" not in plus1_a.fields


def test_face_index_picks_the_face_counted_from_the_left(world):
    two = face_image(4, big=(2, 5), small=(60, 10))
    largest, _ = _build(world, image=two)
    right, _ = _build(world, image=two, face_index=1)
    left, _ = _build(world, image=two, face_index=0)
    adapter = largest.runtime.adapter
    small = torch.from_numpy(world.analyzer.analyze(two, index=1).normed_embedding)[None]
    assert torch.allclose(right.runtime.cond_tokens, adapter.tokens(small), atol=1e-6)
    assert torch.equal(left.runtime.cond_tokens, largest.runtime.cond_tokens)
    with pytest.raises(NoFaceError, match="Adapter 1: Face 2 .* has 2 faces"):
        _build(world, image=two, face_index=2)


def test_no_face_and_missing_face_models_say_what_to_do(world):
    with pytest.raises(NoFaceError, match=r"Adapter 1: reference image 2: No face found") as info:
        _build(world, image=[face_image(1), face_image(2, big=None)])
    assert isinstance(info.value, InputError)
    with pytest.raises(MissingFileError, match=r"scrfd_10g_bnkps\.onnx.*glintr100\.onnx.*insightface/models/"
                                               r"antelopev2.*non-commercial"):
        _build(world, face_pack="antelopev2")
    ctx = build_context(world.unet, [world.root / "clip_vision"])  # a context without face analysis
    with pytest.raises(MissingFileError, match="face analysis is not set up"):
        _build(world, ctx=ctx)


@pytest.mark.parametrize("value,message", [(-2, "face_index -2 is outside"), (100, "outside"), (1.5, "whole number"),
                                           (float("inf"), "whole number")])
def test_face_index_is_range_checked(value, message):
    with pytest.raises(InputError, match=message):
        AdapterUnit(face_index=value)


@pytest.mark.parametrize("field,value", [("s_scale", float("nan")), ("s_scale", 11.0), ("faceid_lora_weight", -20.0),
                                         ("face_pack", "../x"), ("faceid_lora", "maybe")])
def test_faceid_options_are_checked(field, value):
    with pytest.raises(InputError):
        AdapterUnit(**{field: value})


# --- the LoRA --------------------------------------------------------------------------------------------------
def _infile_expected(world, key, strength):
    """{parameter path: dense delta} from the file's LoRA keys, the site numbers read off diffusers' UNet."""
    from face.faceid_weights import diffusers_processor_names
    from fixtures.unets import to_diffusers_unet

    ip = world.nested[key]["ip_adapter"]
    names = diffusers_processor_names(to_diffusers_unet(world.unet, LDM_SD1))
    ldm = {}
    for number, module in enumerate(names):
        for part, layer in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out_0")):
            path = ldm_layer_name(module.replace(".", "_") + f"_{layer}")
            dotted = dict((n.replace(".", "_"), n) for n, _ in world.unet.named_modules())[path]
            ldm[f"{dotted}.weight"] = strength * (ip[f"{number}.to_{part}_lora.up.weight"] @
                                                   ip[f"{number}.to_{part}_lora.down.weight"])
    return ldm


def test_the_files_own_lora_covers_every_attention_at_the_units_strength(world):
    built, _ = _build(world, faceid_lora_weight=0.6)
    deltas = built.runtime.weight_deltas(world.bound)
    expected = _infile_expected(world, "faceid", 0.6)
    assert sorted(deltas) == sorted(expected) and len(deltas) == 8 * len(world.bound.ip_sites())
    assert all(isinstance(d, LowRankDelta) and torch.allclose(d.dense(), expected[p], atol=1e-6)
               for p, d in deltas.items())


@pytest.mark.parametrize("naming,alpha", [("diffusers", None), ("sgm", 2.0)])
def test_the_paired_file_wins_beside_the_model_or_in_the_lora_folder(world, tmp_path, naming, alpha):
    """The paired file is told apart by its values (twice the file's LoRA); both namings map to the same layers."""
    adapters, loras = tmp_path / "adapters", tmp_path / "Lora" / "faceid"
    adapters.mkdir(), loras.mkdir(parents=True)
    model = adapters / "ip-adapter-faceid_sd15.bin"
    torch.save(world.nested["faceid"], model)
    paired = kohya_lora(world.nested["faceid"]["ip_adapter"], to_diffusers_unet(world.unet, LDM_SD1), naming, alpha,
                        scale=2.0)
    expected = _infile_expected(world, "faceid", 2.0 * 0.5)
    for where in (adapters, loras):
        path = where / "IP-Adapter-FaceID_sd15_lora.safetensors"  # any letter case
        save_file(paired, str(path))
        built, _ = _build(world, file=model, ctx=_ctx(world, lora_dirs=[tmp_path / "Lora"]), faceid_lora_weight=0.5)
        deltas = built.runtime.weight_deltas(world.bound)
        assert sorted(deltas) == sorted(expected)
        assert all(torch.allclose(d.dense(), expected[p], atol=1e-5) for p, d in deltas.items())
        path.unlink()


def test_no_lora_when_off_when_the_prompt_applies_it_or_for_portrait(world, tmp_path):
    off, _ = _build(world, faceid_lora=False)
    zero, _ = _build(world, faceid_lora_weight=0.0)
    portrait, _ = _build(world, "portrait")
    assert off.runtime.weight_deltas(world.bound) == {} == zero.runtime.weight_deltas(world.bound)
    assert portrait.runtime.weight_deltas(world.bound) == {} and "faceid_lora" not in portrait.fields
    save_file(kohya_lora(world.nested["faceid"]["ip_adapter"], to_diffusers_unet(world.unet, LDM_SD1)),
              str(tmp_path / "ip-adapter-faceid_sd15_lora.safetensors"))
    ctx = _ctx(world, lora_dirs=[tmp_path], prompt_loras={"ip-adapter-faceid_sd15_lora"})
    in_prompt, ctx = _build(world, ctx=ctx)
    assert in_prompt.runtime.weight_deltas(world.bound) == {}
    assert ctx.notes == ["Adapter 1: the prompt applies <lora:ip-adapter-faceid_sd15_lora> itself, so the unit "
                         "does not apply it again"]


def test_a_file_without_its_lora_runs_without_and_says_so(world, tmp_path):
    stripped = {k: v for k, v in flat(world.nested["faceid"]).items() if "_lora." not in k}
    path = tmp_path / "my-faceid.safetensors"
    save_file(stripped, str(path))
    built, ctx = _build(world, file=path)
    assert built.runtime.weight_deltas(world.bound) == {}
    assert len(ctx.notes) == 1 and "no LoRA for my-faceid" in ctx.notes[0] and "my-faceid_lora.safetensors" in ctx.notes[0]


def test_a_paired_file_that_is_not_a_unet_lora_is_refused(world, tmp_path):
    bad = tmp_path / "x_lora.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    with pytest.raises(FormatError, match="UNet attention layers only"):
        read_paired_lora(bad)
    save_file(flat(world.nested["portrait"]), str(bad))
    with pytest.raises(FormatError, match="not the LoRA of a FaceID model"):
        read_paired_lora(bad)


def test_infotext_fields_are_the_familys_own(world):
    faceid_unit, _ = _build(world)
    assert faceid_unit.fields == ("model", "weight", "start", "end", "face_index", "multi_image", "faceid_lora",
                                  "faceid_lora_weight", "face_pack")
    assert faceid_unit.written.face_pack == "buffalo_l"  # Settings' pack, written as resolved
    plus, _ = _build(world, "plus", face_pack="buffalo_l")
    assert plus.fields[-2:] == ("s_scale", "face_pack")
    assert MultiImage.AVERAGE.value == faceid_unit.written.multi_image.value

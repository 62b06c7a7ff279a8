"""FaceID files: variants and bases recognised from keys and shapes, in the nested ``.bin`` and flat
``.safetensors`` layouts; every key consumed (the LoRA into ``AttentionLoRA`` records) or a
``FormatError`` naming the file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from face.faceid_weights import SD15, face_embeddings, faceid_state_dict, flat
from fixtures.ip import random_ip_state_dict
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet
from lib_adapters.errors import FormatError, IncompatibleModelError
from lib_adapters.formats.faceid import faceid_from_state_dict, load_faceid_adapter
from lib_adapters.formats.faceid_keys import is_faceid_keys
from lib_adapters.models.clip_vision import EncoderNeed
from lib_adapters.models.faceid import FaceIDVariant
from lib_adapters.unet.layout import bind_layout

SITES = {1: 16, 3: 16, 5: 32, 7: 32}  # four attention sites, as a tiny UNet might have
CONTEXT = 24


def _save(tmp_path, nested, name, fmt):
    if fmt == "bin":
        path = tmp_path / f"{name}.bin"
        torch.save(nested, path)
    else:
        path = tmp_path / f"{name}.safetensors"
        save_file(flat(nested), str(path))
    return path


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant,name,expected,tokens,lora", [
    ("faceid", "ip-adapter-faceid_sd15", FaceIDVariant.FACEID, 4, True),
    ("portrait", "ip-adapter-faceid-portrait-v11_sd15", FaceIDVariant.PORTRAIT, 16, False),
    ("unnorm", "ip-adapter-faceid-portrait_sdxl_unnorm", FaceIDVariant.PORTRAIT_UNNORM, 16, False),
    ("plus", "ip-adapter-faceid-plus_sd15", FaceIDVariant.PLUS, 4, True),
    ("plus", "ip-adapter-faceid-plusv2_sd15", FaceIDVariant.PLUS_V2, 4, True),
])
def test_variants_from_keys_in_both_layouts(tmp_path, fmt, variant, name, expected, tokens, lora):
    nested = faceid_state_dict(variant, SITES, CONTEXT, heads=1, clip_dim=40)
    loaded = load_faceid_adapter(_save(tmp_path, nested, name, fmt))
    assert loaded.name == name and loaded.variant is expected and loaded.config.variant is expected
    assert loaded.tokens_per_face == tokens and loaded.config.context_dim == CONTEXT and loaded.site_hidden == SITES
    assert loaded.shortcut is (expected is FaceIDVariant.PLUS_V2)
    assert loaded.normed_embedding is (variant != "unnorm")
    assert loaded.encoder_need == (EncoderNeed(hidden_states=True, width=40) if variant == "plus" else None)
    # every key of the file is in the model or in a LoRA record
    model_keys = len(loaded.model.state_dict())
    lora_keys = sum(len(r.down) + len(r.up) for r in loaded.lora.values())
    assert model_keys + lora_keys == len(flat(nested))
    assert (len(loaded.lora) == 2 * len(SITES)) is lora and (not loaded.lora or
                                                             {r.rank for r in loaded.lora.values()} == {4})
    assert is_faceid_keys(flat(nested))


def test_lora_records_hold_the_file_tensors_by_processor_number():
    nested = faceid_state_dict("faceid", SITES, CONTEXT)
    loaded = faceid_from_state_dict(flat(nested), "ip-adapter-faceid_sd15")
    self_attn, cross_attn = loaded.lora[4], loaded.lora[5]
    assert not self_attn.is_cross_attention and cross_attn.is_cross_attention
    assert self_attn.down["k"].shape == (4, 32) and cross_attn.down["k"].shape == (4, CONTEXT)
    assert torch.equal(cross_attn.up["out"], nested["ip_adapter"]["5.to_out_lora.up.weight"])
    delta = nested["ip_adapter"]["5.to_q_lora.up.weight"] @ nested["ip_adapter"]["5.to_q_lora.down.weight"]
    assert torch.allclose(cross_attn.delta("q"), delta)
    assert torch.equal(loaded.model.site(5).to_k_ip.weight, nested["ip_adapter"]["5.to_k_ip.weight"])


def test_plus_v2_follows_the_caller_over_the_name():
    sd = flat(faceid_state_dict("plus", SITES, CONTEXT, clip_dim=40))
    assert faceid_from_state_dict(sd, "my-faceid-plus", plus_v2=True).variant is FaceIDVariant.PLUS_V2
    assert faceid_from_state_dict(sd, "ip-adapter-faceid-plusv2_sd15", plus_v2=False).variant is FaceIDVariant.PLUS


@pytest.mark.parametrize("variant", ["base", "plus", "full"])
def test_other_ip_adapters_are_not_faceid(variant):
    bound = bind_layout(build_ldm_unet(LDM_SD1))
    sd = flat(random_ip_state_dict(bound, variant, LDM_SD1["context_dim"]))
    assert not is_faceid_keys(sd)
    with pytest.raises(FormatError, match="not a FaceID model"):
        faceid_from_state_dict(sd, "ip-adapter-plus_sd15")


def test_sd15_and_sdxl_files_fit_only_their_unet():
    for cfg, other in ((LDM_SD1, LDM_SDXL), (LDM_SDXL, LDM_SD1)):
        bound = bind_layout(build_ldm_unet(cfg))
        sites = {s.number: s.hidden for s in bound.ip_sites()}
        loaded = faceid_from_state_dict(flat(faceid_state_dict("faceid", sites, cfg["context_dim"])), "faceid")
        loaded.check_compatible(bound, "Adapter 1")
        with pytest.raises(IncompatibleModelError, match="Adapter 1"):
            loaded.check_compatible(bind_layout(build_ldm_unet(other)), "Adapter 1")


def _broken(change):
    nested = faceid_state_dict("faceid", SITES, CONTEXT)
    change(nested)
    return flat(nested)


@pytest.mark.parametrize("change,message", [
    (lambda n: n["ip_adapter"].__setitem__("9.to_k_ip.bias", torch.zeros(3)), "unexpected ip_adapter keys"),
    (lambda n: n["ip_adapter"].pop("3.to_v_lora.up.weight"), "3.to_v_lora.up.weight is missing"),
    (lambda n: n["ip_adapter"].__setitem__("2.to_q_lora.down.weight", torch.zeros(4, 7)), r"is \(4, 7\)"),
    (lambda n: [n["ip_adapter"].pop(k) for k in list(n["ip_adapter"]) if k.startswith("7.to_") and "lora" in k],
     "covers attention processors"),
    (lambda n: n["ip_adapter"].pop("5.to_v_ip.weight"), "missing 1 keys"),
    (lambda n: n["image_proj"].__setitem__("norm.weight", torch.ones(CONTEXT + 1)), "mixes two models"),
    (lambda n: n["image_proj"].__setitem__("extra", torch.ones(1)), "unexpected keys"),
])
def test_damaged_files_are_format_errors_naming_the_file(change, message):
    with pytest.raises(FormatError, match=message) as info:
        faceid_from_state_dict(_broken(change), "my-faceid-file")
    assert "my-faceid-file" in str(info.value)


def test_a_t2i_adapter_file_is_refused():
    with pytest.raises(FormatError, match="not an IP-Adapter FaceID"):
        faceid_from_state_dict({"conv_in.weight": torch.zeros(1), "body.0.block1.weight": torch.zeros(1)}, "t2i")


def test_tokens_for_several_faces_and_the_no_face_tokens():
    loaded = faceid_from_state_dict(flat(faceid_state_dict("portrait", SITES, SD15["context_dim"])), "portrait")
    faces = face_embeddings(3)
    tokens = loaded.tokens(faces)
    assert tokens.shape == (3, 16, 768)
    assert torch.allclose(tokens[1], loaded.tokens(faces[1:2])[0], atol=1e-6)  # each face on its own
    empty = loaded.tokens(torch.zeros(1, 512))
    assert not torch.allclose(empty, tokens[:1])
    with pytest.raises(ValueError, match="no CLIP"):
        loaded.tokens(faces, torch.zeros(3, 5, 40))

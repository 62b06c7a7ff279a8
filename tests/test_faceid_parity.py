"""Numerical truth for IP-Adapter FaceID: our projections and K/V against diffusers' FaceID support.

1. The image projections at the released SD1.5 / SDXL shapes: the same random file converted by
   diffusers' own loader (``_convert_ip_adapter_image_proj_to_diffusers`` -> its
   ``IPAdapterFaceIDImageProjection`` / ``IPAdapterFaceIDPlusImageProjection`` /
   ``IPAdapterPlusImageProjection``) and loaded by ours give the same tokens.
2. The whole unit on tiny UNets of SD1.5 and SDXL structure, every variant: our loaded FaceID file's
   tokens and ``to_k_ip``/``to_v_ip`` in the FaceID runtime (in a ``GenerationSession`` on the genuine
   ldm UNet) against diffusers' UNet2DConditionModel with the file loaded by ``_load_ip_adapter_weights``
   and fed ``image_embeds`` (and, for Plus, the projection's ``clip_embeds``), as its pipelines do with
   ``ip_adapter_image_embeds``; FaceID and Plus also with their paired ``*_lora.safetensors``, which our
   unit applies as forward-level deltas and diffusers loads with its own ``load_lora_weights`` path
   (``lora_state_dict`` + ``load_lora_into_unet``: kohya key conversion, peft layers), as its FaceID
   documentation tells users to.
"""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from face.faceid_weights import CLIP_H, SD15, SDXL, face_embeddings, faceid_state_dict, flat, kohya_lora
from fixtures.ip import CLIP_HIDDEN, CLIP_TOKENS
from fixtures.sessions import hooked
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet, to_diffusers_unet
from lib_adapters.formats.faceid import faceid_from_state_dict
from lib_adapters.formats.faceid_lora import paired_deltas, read_paired_lora
from lib_adapters.inference.faceid import FaceIDUnitRuntime
from lib_adapters.models.faceid import FaceIDVariant
from lib_adapters.unet.layout import bind_layout
from test_ip_parity import _diffusers_with_ip

ONE_SITE = {1: 8}  # the projection test needs ip_adapter weights only for the context width


@pytest.fixture(scope="module")
def converter():
    """Any diffusers UNet: ``_convert_ip_adapter_image_proj_to_diffusers`` does not depend on its size."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


PROJECTION_CASES = [
    # id, shapes, variant, file name, faces, s_scale
    ("sd15-faceid", SD15, "faceid", "ip-adapter-faceid_sd15", 1, 1.0),
    ("sd15-portrait-5-faces", SD15, "portrait", "ip-adapter-faceid-portrait-v11_sd15", 5, 1.0),
    ("sdxl-faceid", SDXL, "faceid", "ip-adapter-faceid_sdxl", 1, 1.0),
    ("sdxl-portrait-3-faces", SDXL, "portrait", "ip-adapter-faceid-portrait_sdxl", 3, 1.0),
    ("sdxl-portrait-unnorm", SDXL, "unnorm", "ip-adapter-faceid-portrait_sdxl_unnorm", 2, 1.0),
    ("sd15-plus", SD15, "plus", "ip-adapter-faceid-plus_sd15", 1, 1.0),
    ("sd15-plusv2", SD15, "plus", "ip-adapter-faceid-plusv2_sd15", 2, 0.7),
    pytest.param("sdxl-plusv2", SDXL, "plus", "ip-adapter-faceid-plusv2_sdxl", 1, 1.3, marks=pytest.mark.slow,
                 id="sdxl-plusv2"),
]


@pytest.mark.parametrize("case,shapes,variant,name,faces,s_scale", PROJECTION_CASES,
                         ids=[c[0] if isinstance(c, tuple) else c.id for c in PROJECTION_CASES])
def test_projection_matches_diffusers_faceid_projection(converter, case, shapes, variant, name, faces, s_scale):
    torch.manual_seed(0)
    nested = faceid_state_dict(variant, ONE_SITE, shapes["context_dim"], shapes["heads"], CLIP_H["clip_dim"], seed=3)
    ours = faceid_from_state_dict(flat(nested), name)
    reference = converter._convert_ip_adapter_image_proj_to_diffusers(nested["image_proj"]).eval()
    embeds = face_embeddings(faces, normed=ours.normed_embedding)
    clip = None
    with torch.no_grad():
        if variant == "plus":
            clip = torch.randn(faces, CLIP_H["clip_tokens"], CLIP_H["clip_dim"])
            reference.clip_embeds = clip[:, None]  # [batch, images, tokens, width], as the pipeline sets it
            reference.shortcut, reference.shortcut_scale = ours.shortcut, s_scale
            expected = reference(embeds)
        elif variant == "unnorm":
            expected = reference(embeds[:, None])  # the unnorm Resampler reads the embedding as one token
        else:
            expected = reference(embeds)
    got = ours.tokens(embeds, clip, s_scale=s_scale)
    tokens = {"portrait": 16, "unnorm": 16}.get(variant, 4)
    assert got.shape == (faces, tokens, shapes["context_dim"]) == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    assert ours.variant is {"faceid": FaceIDVariant.FACEID, "portrait": FaceIDVariant.PORTRAIT,
                            "unnorm": FaceIDVariant.PORTRAIT_UNNORM,
                            "plus": FaceIDVariant.PLUS_V2 if "v2" in name else FaceIDVariant.PLUS}[variant]


def test_plus_v2_shortcut_changes_the_tokens_as_the_reference_formula_says(converter):
    nested = faceid_state_dict("plus", ONE_SITE, SD15["context_dim"], SD15["heads"], CLIP_H["clip_dim"], seed=4)
    plus = faceid_from_state_dict(flat(nested), "ip-adapter-faceid-plus_sd15")
    v2 = faceid_from_state_dict(flat(nested), "ip-adapter-faceid-plusv2_sd15")
    embeds, clip = face_embeddings(1), torch.randn(1, CLIP_H["clip_tokens"], CLIP_H["clip_dim"])
    identity = v2.model.image_proj.id_tokens(embeds)
    perceived = plus.tokens(embeds, clip)
    for s in (0.0, 0.5, 2.0):  # out = id_tokens + s * perceiver(id_tokens, clip)
        assert (v2.tokens(embeds, clip, s_scale=s) - (identity + s * perceived)).abs().max() <= 1e-5
    assert (plus.tokens(embeds, clip, s_scale=0.0) - perceived).abs().max() == 0  # no shortcut: s is unused


UNIT_CASES = [("sd1-faceid", LDM_SD1, "faceid", "ip-adapter-faceid_sd15", 1),
              ("sd1-plus", LDM_SD1, "plus", "ip-adapter-faceid-plus_sd15", 1),
              ("sd1-plusv2", LDM_SD1, "plus", "ip-adapter-faceid-plusv2_sd15", 1),
              ("sd1-portrait", LDM_SD1, "portrait", "ip-adapter-faceid-portrait_sd15", 3),
              ("sdxl-faceid", LDM_SDXL, "faceid", "ip-adapter-faceid_sdxl", 1),
              ("sdxl-plusv2", LDM_SDXL, "plus", "ip-adapter-faceid-plusv2_sdxl", 1),
              ("sdxl-portrait", LDM_SDXL, "portrait", "ip-adapter-faceid-portrait_sdxl", 2),
              ("sdxl-portrait-unnorm", LDM_SDXL, "unnorm", "ip-adapter-faceid-portrait_sdxl_unnorm", 2)]
LORA_CASES = [c for c in UNIT_CASES if c[2] in ("faceid", "plus")]  # the variants released with a LoRA


def _enable_diffusers_peft_backend(monkeypatch) -> None:
    """diffusers 0.31 loads LoRAs only with USE_PEFT_BACKEND, which it sets for transformers >= 4.34; the UNet's
    loader needs peft alone (tests/training/test_lora_diffusers_loader.py explains), so the flag is set here."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "diffusers" and getattr(module, "USE_PEFT_BACKEND", None) is False:
            monkeypatch.setattr(module, "USE_PEFT_BACKEND", True)


def _diffusers_loads_the_lora(ref, path, monkeypatch) -> int:
    """The paired file through diffusers' ``load_lora_weights`` steps for the UNet; the number of peft layers."""
    pytest.importorskip("peft", reason="diffusers injects LoRA layers with peft (requirements-test.txt)")
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    _enable_diffusers_peft_backend(monkeypatch)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=ref, adapter_name="faceid")
    return sum(isinstance(m, LoraLayer) for m in ref.modules())


def _unit_parity(tmp_path, monkeypatch, cfg, variant, file_name, faces, with_lora):
    from face.faceid_weights import diffusers_processor_names

    ldm = build_ldm_unet(cfg, seed=0)
    bound = bind_layout(ldm)
    sites = {s.number: s.hidden for s in bound.ip_sites()}
    nested = faceid_state_dict(variant, sites, cfg["context_dim"], heads=1, clip_dim=CLIP_HIDDEN, seed=3)
    weight, s_scale = 0.8, 0.6
    ref = _diffusers_with_ip(ldm, cfg, nested, weight)  # diffusers' loader reads FaceID files too
    loaded = faceid_from_state_dict(flat(nested), file_name)
    assert len(loaded.lora) == (0 if variant in ("portrait", "unnorm") else 2 * len(sites))
    lora = {}
    if with_lora:  # the paired file as released: kohya keys named after diffusers' modules
        twin = to_diffusers_unet(ldm, cfg)  # numbered before the Plus projection's own attention modules join
        path = tmp_path / f"{file_name}_lora.safetensors"
        save_file(kohya_lora(nested["ip_adapter"], twin), str(path))
        lora = paired_deltas(read_paired_lora(path), bound, 1.0, "Adapter 1")
        assert len(lora) == 4 * len(diffusers_processor_names(twin)) == 8 * len(sites)
        assert _diffusers_loads_the_lora(ref, path, monkeypatch) == len(lora)

    embeds = face_embeddings(faces, seed=1, normed=loaded.normed_embedding)
    zeros = torch.zeros_like(embeds)
    clip = uncond_clip = None
    projection = ref.encoder_hid_proj.image_projection_layers[0]
    if variant == "plus":
        g = torch.Generator().manual_seed(9)
        clip, uncond_clip = (torch.randn(faces, CLIP_TOKENS, CLIP_HIDDEN, generator=g) for _ in range(2))
        projection.clip_embeds = torch.cat([clip, uncond_clip])[:, None]
        projection.shortcut, projection.shortcut_scale = loaded.shortcut, s_scale
    # several faces (Portrait): their tokens side by side, as the reference and diffusers concatenate them
    cond = loaded.tokens(embeds, clip, s_scale).reshape(1, -1, cfg["context_dim"])
    uncond = loaded.tokens(zeros, uncond_clip, s_scale).reshape(1, -1, cfg["context_dim"])
    runtime = FaceIDUnitRuntime("Adapter 1", loaded, cond, uncond, weight=weight, lora=lora)  # type: ignore[arg-type]

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)  # row 0 cond, row 1 uncond
    t = torch.tensor([100.0, 100.0])
    ctx = torch.randn(2, 7, cfg["context_dim"], generator=g)
    with torch.no_grad():
        with hooked(ldm, [runtime]) as session:
            session.on_denoiser(1, 1, 0, 20)
            ours = ldm(x, t, context=ctx)
        # the unnorm Resampler reads each embedding as one token: [rows, images, 1, 512]
        image_embeds = torch.stack([embeds, zeros])[:, :, None] if variant == "unnorm" else torch.stack([embeds, zeros])
        expected = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [image_embeds]}).sample
        baseline = ldm(x, t, context=ctx)
    assert (expected - baseline).abs().max() > 1e-2, "the FaceID unit must visibly change the output"
    return (ours - expected).abs().max().item()


@pytest.mark.parametrize("name,cfg,variant,file_name,faces", UNIT_CASES, ids=[c[0] for c in UNIT_CASES])
def test_faceid_unit_matches_diffusers(tmp_path, monkeypatch, name, cfg, variant, file_name, faces):
    assert _unit_parity(tmp_path, monkeypatch, cfg, variant, file_name, faces, with_lora=False) <= 1e-4


@pytest.mark.parametrize("name,cfg,variant,file_name,faces", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_faceid_unit_with_its_paired_lora_matches_diffusers_load_lora_weights(tmp_path, monkeypatch, name, cfg,
                                                                               variant, file_name, faces):
    assert _unit_parity(tmp_path, monkeypatch, cfg, variant, file_name, faces, with_lora=True) <= 1e-4

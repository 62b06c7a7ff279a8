"""Numerical truth for IP-Adapters: our attn2 wrapper on the genuine ldm UNet against diffusers'
UNet2DConditionModel with the same file loaded through diffusers' own IP-Adapter loader."""
from __future__ import annotations

import pytest
import torch

from fixtures.ip import clip_outputs, random_ip_state_dict
from fixtures.sessions import hooked
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet, to_diffusers_unet
from lib_adapters.formats.ip import ip_from_state_dict
from lib_adapters.formats.reader import flatten_state_dict
from lib_adapters.inference.ip import IPUnitRuntime
from lib_adapters.models.ip_adapter import IPProjection
from lib_adapters.unet.layout import bind_layout

CASES = [("sd1-base", LDM_SD1, "base"), ("sd1-plus", LDM_SD1, "plus"), ("sd1-full-face", LDM_SD1, "full"),
         ("sdxl-base", LDM_SDXL, "base"), ("sdxl-plus", LDM_SDXL, "plus")]


def _diffusers_with_ip(ldm, cfg, nested, weight):
    ref = to_diffusers_unet(ldm, cfg)
    ref._load_ip_adapter_weights([nested])
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [weight]
    return ref


@pytest.mark.parametrize("name,cfg,variant", CASES, ids=[c[0] for c in CASES])
def test_ip_unit_matches_diffusers_ip_adapter(name, cfg, variant):
    ldm = build_ldm_unet(cfg, seed=0)
    bound = bind_layout(ldm)
    nested = random_ip_state_dict(bound, variant, cfg["context_dim"], seed=3)
    weight = 0.8
    ref = _diffusers_with_ip(ldm, cfg, nested, weight)
    loaded = ip_from_state_dict(flatten_state_dict(nested), name)
    expected_projection = {"base": IPProjection.PLAIN, "plus": IPProjection.PLUS, "full": IPProjection.FULL_FACE}
    assert loaded.variant is expected_projection[variant]

    cond_clip, uncond_clip = clip_outputs(variant, seed=1), clip_outputs(variant, seed=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)  # row 0 cond, row 1 uncond
    t = torch.tensor([100.0, 100.0])
    ctx = torch.randn(2, 7, cfg["context_dim"], generator=g)
    runtime = IPUnitRuntime.from_encoder_outputs("Adapter 1", loaded, cond_clip, uncond_clip, weight=weight)
    with torch.no_grad():
        with hooked(ldm, [runtime]) as session:
            session.on_denoiser(1, 1, 0, 20)
            ours = ldm(x, t, context=ctx)
        embeds = torch.cat([cond_clip, uncond_clip])[:, None]  # [rows, 1 image, ...]
        expected = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [embeds]}).sample
        baseline = ldm(x, t, context=ctx)
    assert (expected - baseline).abs().max() > 1e-2, "the IP-Adapter must visibly change the output"
    assert (ours - expected).abs().max().item() <= 1e-4

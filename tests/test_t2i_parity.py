"""Numerical truth for T2I-Adapters: our hook on the genuine ldm UNet vs diffusers end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.adapters import diffusers_adapter, save_both_layouts
from fixtures.sessions import hooked
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet, to_diffusers_unet
from lib_adapters.formats.t2i import load_t2i_adapter
from lib_adapters.inference.t2i import T2IUnitRuntime
from lib_adapters.inference.units import AdapterUnit

LATENT = 16  # latent 16x16 -> a 128x128 condition, so no resizing is involved


def _condition(channels: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(LATENT * 8, LATENT * 8, 3), dtype=np.uint8)
    if channels == 1:
        image[..., 1] = image[..., 2] = image[..., 0]
    return image


def _inputs(context_dim: int, rows: int = 2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([25.0, 700.0][:rows])
    ctx = torch.randn(rows, 7, context_dim, generator=g)
    return x, t, ctx


CASES = [
    ("sd1-rgb", LDM_SD1, "full_adapter", 3, 1.0),
    ("sd1-1ch", LDM_SD1, "full_adapter", 1, 0.7),
    ("sd1-light", LDM_SD1, "light_adapter", 3, 1.3),
    ("sdxl-rgb", LDM_SDXL, "full_adapter_xl", 3, 1.0),
]


@pytest.mark.parametrize("name,ldm_cfg,kind,channels,weight", CASES, ids=[c[0] for c in CASES])
def test_hooked_ldm_unet_matches_diffusers_with_adapter_residuals(tmp_path, name, ldm_cfg, kind, channels, weight):
    ldm = build_ldm_unet(ldm_cfg, seed=0)
    ref_unet = to_diffusers_unet(ldm, ldm_cfg)
    ref_adapter = diffusers_adapter(kind, channels, seed=5)
    pth, _ = save_both_layouts(ref_adapter, tmp_path, name, prefix_tencentarc=True)
    image = _condition(channels)
    x, t, ctx = _inputs(ldm_cfg["context_dim"])

    unit = AdapterUnit(enabled=True, model=name, weight=weight, resize_mode="Just Resize")
    runtime = T2IUnitRuntime.from_unit("Adapter 1", unit, load_t2i_adapter(pth), image)
    with torch.no_grad():
        with hooked(ldm, [runtime]):
            ours = ldm(x, t, context=ctx)
        cond = torch.from_numpy(image).float().div(255).permute(2, 0, 1)[None][:, :channels]
        # diffusers' pipelines repeat residuals to the batch; its SDXL mid-block add needs equal shapes
        residuals = [(r * weight).repeat(x.shape[0], 1, 1, 1) for r in ref_adapter(cond)]
        expected = ref_unet(x, t, encoder_hidden_states=ctx, down_intrablock_additional_residuals=residuals).sample
        baseline = ref_unet(x, t, encoder_hidden_states=ctx).sample

    assert (expected - baseline).abs().max() > 1e-2, "the adapter must visibly change the output"
    assert (ours - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter", "full_adapter_xl"])
def test_tencentarc_file_and_diffusers_twin_give_identical_features(tmp_path, kind):
    pth, st = save_both_layouts(diffusers_adapter(kind, 3, seed=2), tmp_path, kind)
    a, b = load_t2i_adapter(pth), load_t2i_adapter(st)
    assert a.config == b.config
    image = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        fa, fb = a.module(image), b.module(image)
    assert len(fa) == 4
    for x, y in zip(fa, fb):
        assert torch.equal(x, y)

"""The built-in tiny model: ldm UNets with SD1.x's and SDXL's block structure at toy width.

Used by the offline demo, the benchmarks' smoke mode and the tests. Needs the ``ldm`` package
(present inside the WebUI; ``stable-diffusion-sdkit`` provides it elsewhere). Weights are random
and seeded; nothing is downloaded.
"""
from __future__ import annotations

import torch

_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
               use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False)

# 12 input blocks, attention at the first three levels: SD1.x's structure.
TINY_SD1 = dict(_COMMON, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], num_heads=4)
# 9 input blocks, no attention at the first level, linear projections: SDXL's structure (sgm adds
# `label_emb` for the size conditioning, which the adapter paths never touch).
TINY_SDXL = dict(_COMMON, channel_mult=[1, 2, 4], attention_resolutions=[4, 2], num_head_channels=8,
                 use_linear_in_transformer=True, context_dim=48)


def build_tiny_unet(config: dict = TINY_SD1, seed: int = 0) -> torch.nn.Module:
    """A genuine ldm ``UNetModel`` with random weights (zero-initialised layers filled too)."""
    try:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError as exc:  # outside the WebUI
        raise ImportError("the tiny model needs the 'ldm' package: pip install --no-deps stable-diffusion-sdkit "
                          "einops omegaconf") from exc
    torch.manual_seed(seed)
    unet = UNetModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet.eval()


def scaled_linear_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD's training noise schedule (as in ldm's ``make_beta_schedule('linear')``)."""
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()

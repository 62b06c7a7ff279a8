"""Shared helpers for the training tests: small datasets made on the fly, tiny models, a WebUI-faithful SDXL view."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw
from torch import nn

SHAPES = (("a red circle", (220, 30, 30), "ellipse"), ("a blue square", (30, 30, 220), "rectangle"),
          ("a green circle", (30, 200, 30), "ellipse"), ("a yellow square", (230, 220, 20), "rectangle"))


def shape_image(color, kind: str, size: tuple[int, int] = (64, 64)) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, (255, 255, 255))
    getattr(ImageDraw.Draw(image), kind)((w // 5, h // 5, w - w // 5, h - h // 5), fill=color)
    return image


def make_shapes_dataset(root: Path, folder: str = "2_shapes", count: int = 4, size=(64, 64)) -> Path:
    """``count`` coloured shapes with captions in ``root/folder``."""
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    for i, (caption, color, kind) in enumerate(SHAPES[:count]):
        shape_image(color, kind, size).save(target / f"{i}.png")
        (target / f"{i}.txt").write_text(caption)
    return root


def tiny(arch: str = "sd1", seed: int = 0):
    """(the stub ``shared.sd_model`` look-alike, an ``LdmBackend`` over it)."""
    from tiny_model import build_tiny_sd_model

    from lib_adapters.training.backends.ldm import LdmBackend

    model = build_tiny_sd_model(arch, seed)
    return model, LdmBackend(model)


class _OpenClipBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 4)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(2 * width, width)))


def webui_sdxl_view(sd_model, width: int = 16, layers: int = 2):
    """The stub SDXL model as the WebUI's Lora extension sees a real one: the second text encoder is OpenCLIP
    (``embedders[1].wrapped.model.transformer.resblocks.N.{attn,mlp.c_fc,mlp.c_proj}``), not transformers-named."""
    resblocks = nn.ModuleList(_OpenClipBlock(width) for _ in range(layers))
    open_clip = nn.Module()
    open_clip.transformer = nn.Module()
    open_clip.transformer.resblocks = resblocks
    second = SimpleNamespace(wrapped=SimpleNamespace(named_modules=lambda: [(f"model.{n}" if n else "model", m)
                                                                            for n, m in open_clip.named_modules()]))
    embedders = [sd_model.conditioner.embedders[0], second]
    return SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=embedders), model=sd_model.model)


def unet_inputs(model, batch: int = 2, size: int = 8, seed: int = 3):
    """Latents, timesteps and conditioning for one UNet call on the tiny model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red circle", "a blue square"][:batch])
    return x, t, cond

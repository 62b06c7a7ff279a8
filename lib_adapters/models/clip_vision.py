"""CLIP vision encoders (transformers' ``CLIPVisionModelWithProjection``) and what adapters need of them.

``ClipVisionEncoder`` wraps a loaded encoder (``formats/clip_vision.py`` reads the files): images are
prepared as the reference does (shortest side to the encoder's size with bicubic, centre crop, CLIP
mean/std), or squashed to a square without cropping, as sd-webui-controlnet does. ``EncoderShape``
is its config; the two things a file's shapes cannot tell come from the three released encoders: 16
heads for widths 1024 (ViT-L), 1280 (ViT-H) and 1664 (ViT-bigG), and quick-GELU only for OpenAI's
ViT-L. ``EncoderNeed`` is what an adapter asks of an encoder (which output, how wide).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_KNOWN_HEADS = {1024: 16, 1280: 16, 1664: 16}


class CropMode(str, Enum):
    CENTER = "Center crop"  # the reference's CLIPImageProcessor
    SQUASH = "Squash"  # whole image, aspect ratio not kept

    @classmethod
    def parse(cls, value: object) -> "CropMode":
        for mode in cls:
            if value in (mode, mode.value, mode.name, mode.name.lower()):
                return mode
        raise ValueError(f"crop mode {value!r} is not one of: {', '.join(m.value for m in cls)}")


@dataclass(frozen=True)
class EncoderShape:
    hidden_size: int
    projection_dim: int
    num_layers: int
    patch_size: int
    image_size: int
    intermediate_size: int

    @property
    def num_heads(self) -> int:
        return _KNOWN_HEADS.get(self.hidden_size, max(1, self.hidden_size // 64))

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.hidden_size == 1024 else "gelu"


@dataclass(frozen=True)
class EncoderNeed:
    """What an adapter needs from a CLIP vision encoder."""

    hidden_states: bool  # penultimate hidden states (plus, full-face) or pooled image_embeds (base)
    width: int  # hidden size (hidden_states) or projection size (image_embeds)

    @property
    def description(self) -> str:
        names = {(False, 1024): "ViT-H/14", (False, 1280): "ViT-bigG/14", (True, 1280): "ViT-H/14",
                 (True, 1664): "ViT-bigG/14", (False, 768): "ViT-L/14", (True, 1024): "ViT-L/14"}
        kind = "hidden states" if self.hidden_states else "image embeddings"
        return f"{names.get((self.hidden_states, self.width), 'CLIP vision')} ({kind} of width {self.width})"


@dataclass
class ClipVisionEncoder:
    name: str
    shape: EncoderShape
    model: torch.nn.Module  # transformers CLIPVisionModelWithProjection, fp32, eval
    _empty_hidden: dict = field(default_factory=dict, repr=False, compare=False)  # device -> cached "no image"

    def preprocess(self, images: Sequence[np.ndarray], crop: CropMode) -> torch.Tensor:
        size = self.shape.image_size
        batch = [_prepare(image, size, crop) for image in images]
        pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def encode(self, pixels: torch.Tensor, hidden_states: bool) -> torch.Tensor:
        """Pooled projected ``image_embeds`` [N, P], or the penultimate hidden states [N, T, H]."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(pixel_values=pixels.to(device), output_hidden_states=hidden_states)
        return (out.hidden_states[-2] if hidden_states else out.image_embeds).float().cpu()

    def empty_hidden_states(self) -> torch.Tensor:
        """The penultimate hidden states of the all-zero input (the reference's "no image" for Plus models).
        The same for every job with these weights, so it is computed once per device (a ViT-H pass costs as
        much as several UNet steps on a CPU); the cached copy is cloned so callers cannot alter it."""
        device = next(self.model.parameters()).device
        cache = self._empty_hidden
        if device not in cache:
            size = self.shape.image_size
            cache[device] = self.encode(torch.zeros(1, 3, size, size), hidden_states=True)
        return cache[device].clone()

    def last_hidden_state(self, images: Sequence[np.ndarray], crop: CropMode) -> torch.Tensor:
        """The final layer's hidden states [N, T, H]: what the style T2I-Adapter reads."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(pixel_values=self.preprocess(images, crop).to(device))
        return out.last_hidden_state.float().cpu()

    def encode_images(self, images: Sequence[np.ndarray], crop: CropMode, hidden_states: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs for the images and for "no image", as the reference computes uncond: zero pixels
        after normalisation through the encoder for hidden states, zero embeddings otherwise."""
        cond = self.encode(self.preprocess(images, crop), hidden_states)
        return cond, self.empty_hidden_states() if hidden_states else self.zero_image_embeds(cond)

    @staticmethod
    def zero_image_embeds(cond: torch.Tensor) -> torch.Tensor:
        """The reference's "no image" for pooled embeddings: zeros, no encoder pass (one row like ``cond``'s)."""
        return torch.zeros_like(cond[:1])


def _prepare(image: np.ndarray, size: int, crop: CropMode) -> np.ndarray:
    """HWC uint8 -> HWC float in [0, 1] of size x size."""
    pil = Image.fromarray(image)
    if crop is CropMode.SQUASH:
        pil = pil.resize((size, size), Image.BICUBIC)
    else:
        w, h = pil.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # CLIPImageProcessor truncates the same way
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    return np.asarray(pil, dtype=np.float32) / 255.0

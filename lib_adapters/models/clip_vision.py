"""CLIP vision encoders from local files (transformers' ``CLIPVisionModelWithProjection`` layout).

The config (width, depth, patch, image size, projection) is read from the file's shapes; the two
things shapes cannot tell come from the three released encoders: 16 heads for widths 1024 (ViT-L),
1280 (ViT-H) and 1664 (ViT-bigG), and quick-GELU only for OpenAI's ViT-L. Images are prepared as
the reference does (shortest side to the encoder's size with bicubic, centre crop, CLIP mean/std),
or squashed to a square without cropping, as sd-webui-controlnet does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import FormatError
from ..formats.reader import read_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIX = "vision_model."
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


def encoder_shape(sd: Mapping[str, torch.Tensor], source: str) -> EncoderShape:
    try:
        patch = sd[f"{_PREFIX}embeddings.patch_embedding.weight"]
        positions = int(sd[f"{_PREFIX}embeddings.position_embedding.weight"].shape[0])
        layers = {int(m.group(1)) for k in sd for m in [re.match(rf"{_PREFIX}encoder\.layers\.(\d+)\.", k)] if m}
        return EncoderShape(
            hidden_size=int(sd[f"{_PREFIX}embeddings.class_embedding"].shape[0]),
            projection_dim=int(sd["visual_projection.weight"].shape[0]),
            num_layers=len(layers),
            patch_size=int(patch.shape[-1]),
            image_size=int(patch.shape[-1] * math.isqrt(positions - 1)),
            intermediate_size=int(sd[f"{_PREFIX}encoder.layers.0.mlp.fc1.weight"].shape[0]),
        )
    except KeyError as exc:
        raise FormatError(f"{source}: not a CLIP vision encoder in the transformers layout (missing {exc}). "
                          "Use the image_encoder files that come with IP-Adapter (model.safetensors).") from exc


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


def encoder_from_state_dict(sd: Mapping[str, torch.Tensor], name: str) -> ClipVisionEncoder:
    """The encoder with the file's weights. The network is built on the meta device and then takes fp32
    copies of the file's tensors (``assign``): a ViT-H/14 is never initialised at random only to be
    overwritten, which saves that allocation and seconds of CPU time. Copies, because safetensors hands out
    tensors backed by a memory map of the file: a cached encoder must not keep the file mapped (it could not
    be replaced on Windows, and a file rewritten in place would change or fault under it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    shape = encoder_shape(sd, name)
    config = CLIPVisionConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                              projection_dim=shape.projection_dim, num_hidden_layers=shape.num_layers,
                              num_attention_heads=shape.num_heads, image_size=shape.image_size,
                              patch_size=shape.patch_size, hidden_act=shape.activation)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    state = {k: v.to(torch.float32, copy=True) for k, v in sd.items()
             if not k.endswith("position_ids")}  # position_ids: a buffer in older files
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of the wrong shape
        first = str(exc).strip().splitlines()[-1].strip()
        raise FormatError(f"{name}: CLIP vision weights do not fit: {first}") from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FormatError(f"{name}: CLIP vision weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    embeddings = model.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))  # the only tensor not in files
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise FormatError(f"{name}: CLIP vision weights do not fit: no values for {left[:3]}")
    return ClipVisionEncoder(name, shape, model.eval().requires_grad_(False))


def load_clip_vision(path: str | Path) -> ClipVisionEncoder:
    path = Path(path)
    return encoder_from_state_dict(read_weights(path), path.stem)

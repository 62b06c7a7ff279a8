"""CLIP vision encoder files (transformers' ``CLIPVisionModelWithProjection`` layout): shape and loading.

The encoder's config (width, depth, patch, image size, projection) is read from the file's shapes
(``encoder_shape``); ``models/clip_vision.py`` supplies what shapes cannot tell (heads, activation).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import FormatError
from ..models.clip_vision import ClipVisionEncoder, EncoderShape
from .reader import read_weights
from .state_dict import StateDict, numbered

_PREFIX = "vision_model."


def encoder_shape(sd: StateDict, source: str) -> EncoderShape:
    try:
        patch = sd[f"{_PREFIX}embeddings.patch_embedding.weight"]
        positions = int(sd[f"{_PREFIX}embeddings.position_embedding.weight"].shape[0])
        return EncoderShape(
            hidden_size=int(sd[f"{_PREFIX}embeddings.class_embedding"].shape[0]),
            projection_dim=int(sd["visual_projection.weight"].shape[0]),
            num_layers=len(numbered(sd, rf"{_PREFIX}encoder\.layers\.(\d+)\.")),
            patch_size=int(patch.shape[-1]),
            image_size=int(patch.shape[-1] * math.isqrt(positions - 1)),
            intermediate_size=int(sd[f"{_PREFIX}encoder.layers.0.mlp.fc1.weight"].shape[0]),
        )
    except KeyError as exc:
        raise FormatError(f"{source}: not a CLIP vision encoder in the transformers layout (missing {exc}). "
                          "Use the image_encoder files that come with IP-Adapter (model.safetensors).") from exc


def encoder_from_state_dict(sd: StateDict, name: str) -> ClipVisionEncoder:
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

"""What tells an IP-Adapter FaceID file from other IP-Adapters: its keys (and one shape), in one place.

``detect.py``'s signature table asks ``is_faceid_keys`` (so a FaceID file is detected as its own
family before the IP-Adapter signature, which its keys also match) and ``faceid.py`` asks
``variant_of_keys`` which projection it loads. Detection may see key names only (the model list
reads safetensors headers, values ``None``): what needs a shape then says "not FaceID", and the
file is listed as an IP-Adapter, which is all listing needs.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from ..models.faceid import FACE_EMBEDDING_DIM, FaceIDVariant

LORA_KEY = re.compile(r"(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


def variant_of_keys(image_proj: Mapping[str, object]) -> Optional[FaceIDVariant]:
    """The FaceID variant these ``image_proj`` keys show, or None for other IP-Adapters. Keys tell the projection
    only: ``faceid.faceid_config`` refines FaceID into Portrait (16 tokens) and Plus into Plus v2 (the name)."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return FaceIDVariant.PLUS
    if "proj.0.weight" in image_proj and "norm.weight" in image_proj and "proj.3.weight" not in image_proj:
        return FaceIDVariant.FACEID
    proj_in = image_proj.get("proj_in.weight")
    shape = getattr(proj_in, "shape", None)
    if "latents" in image_proj and shape is not None and int(shape[1]) == FACE_EMBEDDING_DIM:
        return FaceIDVariant.PORTRAIT_UNNORM  # no CLIP encoder has 512-wide hidden states: a face embedding
    return None


def is_faceid_keys(sd: Mapping[str, object]) -> bool:
    """True for a flat FaceID file (``image_proj.*``/``ip_adapter.*`` keys), False for other IP-Adapters."""
    if not any(k.startswith("ip_adapter.") for k in sd):
        return False
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    if not proj:
        return False
    return variant_of_keys(proj) is not None or any(LORA_KEY.match(k[len("ip_adapter."):]) for k in sd
                                                      if k.startswith("ip_adapter."))

"""Latent cache: VAE latents kept in memory and optionally on disk, keyed so that a stale one is never used.

The key covers everything the latent depends on: the model's identity (its checkpoint hash), the
VAE's identity (a fingerprint of its weights, since the WebUI can swap VAEs under the same
checkpoint), the image file (path, byte size, modification time) and how it is fitted (bucket,
resize, crop). A changed image, VAE or bucket gives a new key; kohya's cache checks only shapes.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .buckets import Placement


def module_fingerprint(module: nn.Module, tensors: int = 4) -> str:
    """A short hash of a module's parameter names, shapes and the bytes of its first/last tensors."""
    params = list(module.state_dict().items())
    digest = hashlib.sha256()
    for name, value in params:
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    for _, value in params[: tensors // 2] + params[-(tensors - tensors // 2):]:
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_cache_file(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one cache file (safetensors inside) in a single step: a killed run leaves a ``.tmp``, never half a file.
    The caches (latents, CLIP features, face embeddings) share it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class CacheIdentity:
    """Which model and VAE made the latents."""

    model: str
    vae: str


def cache_key(identity: CacheIdentity, image: Path, placement: Placement) -> str:
    stat = Path(image).stat()
    fields = dict(model=identity.model, vae=identity.vae, image=str(Path(image).resolve()), size=stat.st_size,
                  mtime_ns=stat.st_mtime_ns, bucket=[placement.bucket.width, placement.bucket.height],
                  resized=list(placement.resized), crop=[placement.crop_left, placement.crop_top])
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class LatentCache:
    """``get``/``put`` latents ``[C, h, w]`` (fp32, CPU); ``folder=None`` keeps them in memory only."""

    def __init__(self, identity: CacheIdentity, folder: Path | None = None):
        self.identity = identity
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.latent"  # safetensors inside; not named so, or the WebUI would list it as a LoRA

    def get(self, image: Path, placement: Placement) -> torch.Tensor | None:
        key = cache_key(self.identity, image, placement)
        latent = self._memory.get(key)
        if latent is None and self.folder is not None and self._file(key).is_file():
            try:
                latent = load_file(str(self._file(key)))["latent"]
            except Exception:  # a damaged cache file is recomputed, never trusted
                latent = None
            if latent is not None:
                self._memory[key] = latent
        if latent is None:
            self.misses += 1
        else:
            self.hits += 1
        return latent

    def put(self, image: Path, placement: Placement, latent: torch.Tensor) -> None:
        key = cache_key(self.identity, image, placement)
        latent = latent.detach().float().cpu().contiguous()
        self._memory[key] = latent
        if self.folder is not None:
            save_cache_file(self._file(key), {"latent": latent},
                            {"image": str(image), "model": self.identity.model, "vae": self.identity.vae})

"""CLIP vision encoder outputs kept between generations, so a repeated reference costs no encoder pass.

An IP unit's reference images go through a CLIP vision encoder (a ViT-H/14 pass costs as much as
a few UNet steps on a CPU); the style T2I-Adapter reads the same kind of encoder. The outputs
depend only on the encoder file, the pixels, how the image reaches the encoder (crop mode) and
which output is read, so they are cached under exactly that key: the encoder's path, size and
mtime, a digest of each image's pixels (in order: a batch is encoded as one batch, so a hit returns
bit for bit what a miss computes), the crop mode and the output. The multi-image mode (average or
concatenate the tokens) acts after the projection, on these outputs, so it needs no entry of its
own: switching it reuses the encoding. The encoder itself is loaded only on a miss.

The cache takes other keys too: the IP family keeps its image tokens (the adapter's projection of
those outputs) under the adapter file and the multi-image mode besides the encoding's key
(``ip.TokenKey``), so a repeated unit costs neither an encoder pass nor a projection.

The cache is small (a few dozen entries of at most a few MB each) and is emptied with the model
cache when the checkpoint or the device changes.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from ..models.clip_vision import ClipVisionEncoder, CropMode
from .cache import AdapterCache, FileKey

DEFAULT_MAX_ITEMS = 32  # ViT-H hidden states are 1.3 MB per image, plus tokens 16 x 768: tens of MB at most


class EncoderOutput(str, Enum):
    IMAGE_EMBEDS = "image_embeds"  # pooled and projected: IP-Adapter base/light
    PENULTIMATE = "penultimate hidden states"  # IP-Adapter plus, plus-face, full-face
    LAST_HIDDEN = "last hidden state"  # the style T2I-Adapter


@dataclass(frozen=True)
class EncodingKey:
    encoder: FileKey
    images: tuple[str, ...]  # pixel digests, in order; () is the "no image" input
    crop: CropMode | None  # None for the "no image" input, which is not an image
    output: EncoderOutput


def image_digest(image: np.ndarray) -> str:
    """Digest of an image's pixels and shape (two images with the same bytes but another shape differ)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclass
class EncodingCache:
    max_items: int = DEFAULT_MAX_ITEMS
    _items: "OrderedDict[Hashable, torch.Tensor]" = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0

    def get(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached output for ``key`` or ``compute()``'s; callers get their own copy to use freely."""
        cached = self._items.get(key)
        if cached is None:
            self.misses += 1
            cached = compute().detach().cpu()
            self._items[key] = cached
            while len(self._items) > max(self.max_items, 0):
                self._items.popitem(last=False)
        else:
            self.hits += 1
            self._items.move_to_end(key)
        return cached.clone()

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ReferenceEncoder:
    """One encoder file used through both caches: outputs from the encoding cache, the encoder (from the
    model cache, read from disk only when not held) only for what is not cached."""

    models: AdapterCache
    encodings: EncodingCache
    path: Path
    device: torch.device = torch.device("cpu")

    def ip_outputs(self, images: Sequence[np.ndarray], crop: CropMode, hidden_states: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """An IP unit's encoder outputs for its images and for "no image", as
        ``ClipVisionEncoder.encode_images`` computes them (on ``device``, returned on the CPU)."""
        output = EncoderOutput.PENULTIMATE if hidden_states else EncoderOutput.IMAGE_EMBEDS
        with self._lazy_encoder(on_device=True) as encoder:
            cond = self._cached(images, crop, output,
                                lambda: encoder().encode(encoder().preprocess(images, crop), hidden_states))
            if hidden_states:
                uncond = self._cached((), None, output, lambda: encoder().empty_hidden_states())
            else:
                uncond = ClipVisionEncoder.zero_image_embeds(cond)
        return cond, uncond

    def last_hidden_state(self, images: Sequence[np.ndarray], crop: CropMode) -> torch.Tensor:
        """The final layer's hidden states (the style adapter's input), computed on the CPU as before."""
        with self._lazy_encoder(on_device=False) as encoder:
            return self._cached(images, crop, EncoderOutput.LAST_HIDDEN,
                                lambda: encoder().last_hidden_state(images, crop))

    def encoding_key(self, images: Sequence[np.ndarray], crop: CropMode | None, output: EncoderOutput) -> EncodingKey:
        return EncodingKey(FileKey.of(self.path), tuple(image_digest(i) for i in images), crop, output)

    def _cached(self, images: Sequence[np.ndarray], crop: CropMode | None, output: EncoderOutput,
                compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.encodings.get(self.encoding_key(images, crop, output), compute)

    @contextlib.contextmanager
    def _lazy_encoder(self, on_device: bool) -> Iterator[Callable[[], ClipVisionEncoder]]:
        """A getter that loads the encoder (and moves it to ``device``) on first call only, so nothing is
        loaded when every output is cached; the encoder goes back to system memory at the end."""
        held: list[ClipVisionEncoder] = []

        def get() -> ClipVisionEncoder:
            if not held:
                encoder = self.models.load_encoder(self.path)
                if on_device:
                    encoder.model.to(self.device)
                held.append(encoder)
            return held[0]

        try:
            yield get
        finally:
            if held and on_device:
                held[0].model.to("cpu")  # it waits in system memory between uses, as before

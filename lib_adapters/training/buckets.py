"""Aspect-ratio buckets and the deterministic order in which batches are drawn.

Buckets (as in kohya's ``make_bucket_resolutions``): sides are multiples of 64, the area stays at or
under ``resolution**2``, the sides range from ``resolution/2`` to ``2*resolution``. Each image goes
to the bucket nearest its aspect ratio (in log space, ties to the larger area), is scaled to cover
the bucket and centre-cropped. A batch holds images of one bucket only. The order of batches depends
on ``(seed, epoch)`` alone, so a position ``(epoch, batch)`` is all that resume needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .data import ImageRecord

STEP = 64


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class Placement:
    """How an image is fitted into its bucket: resized to ``resized`` then cropped at ``crop_left/top``."""

    bucket: Bucket
    original: tuple[int, int]  # (width, height) of the file
    resized: tuple[int, int]
    crop_left: int
    crop_top: int


def bucket_sizes(resolution: int, step: int = STEP) -> tuple[Bucket, ...]:
    """All buckets for ``resolution`` (sorted by width): the square plus every width/height pair."""
    max_area = resolution * resolution
    min_side = max(step, (resolution // 2) // step * step)
    max_side = resolution * 2
    sizes = {Bucket(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            sizes.add(Bucket(width, height))
            sizes.add(Bucket(height, width))
    return tuple(sorted(sizes))


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest the image's aspect ratio (log distance); ties go to the larger area, then the smaller width."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.aspect) - log_aspect), 12), -b.width * b.height, b.width))


def place(width: int, height: int, bucket: Bucket) -> Placement:
    """Scale to cover the bucket (never leaving a gap), then centre-crop."""
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    return Placement(bucket, (width, height), resized, (resized[0] - bucket.width) // 2,
                     (resized[1] - bucket.height) // 2)


def fit_to_bucket(im: Image.Image, placement: Placement) -> Image.Image:
    """Resize and crop as ``placement`` says (also used for T2I conditions, which must match their image)."""
    if im.size != placement.resized:
        im = im.resize(placement.resized, Image.BICUBIC)
    b = placement.bucket
    return im.crop((placement.crop_left, placement.crop_top, placement.crop_left + b.width, placement.crop_top + b.height))


def load_pixels(path, placement: Placement) -> torch.Tensor:
    """The image as a ``[3, H, W]`` float tensor in [-1, 1], fitted to its bucket."""
    with Image.open(path) as im:
        im = fit_to_bucket(im.convert("RGB"), placement)
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class Batch:
    epoch: int
    index: int  # position of this batch inside its epoch
    bucket: Bucket
    records: tuple[int, ...]  # indices into the dataset's record list


class BatchPlan:
    """Which records go together, in which order, for every epoch; pure function of (seed, epoch)."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int, batch_size: int, seed: int, buckets: bool):
        self.batch_size = batch_size
        self.seed = seed
        sizes = bucket_sizes(resolution) if buckets else (Bucket(resolution, resolution),)
        self.placements = [place(r.width, r.height, assign_bucket(r.width, r.height, sizes)) for r in records]
        self._by_bucket: dict[Bucket, list[int]] = {}
        for i, (record, placement) in enumerate(zip(records, self.placements)):
            self._by_bucket.setdefault(placement.bucket, []).extend([i] * record.repeats)
        self._cache: dict[int, list[Batch]] = {}

    @property
    def bucket_counts(self) -> dict[Bucket, int]:
        """Images per bucket per epoch (repeats included)."""
        return {b: len(v) for b, v in sorted(self._by_bucket.items())}

    def epoch(self, epoch: int) -> list[Batch]:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            groups = []
            for bucket, indices in sorted(self._by_bucket.items()):
                order = [indices[i] for i in rng.permutation(len(indices))]
                groups += [(bucket, tuple(order[i:i + self.batch_size])) for i in range(0, len(order), self.batch_size)]
            self._cache = {epoch: [Batch(epoch, n, groups[k][0], groups[k][1])
                                   for n, k in enumerate(rng.permutation(len(groups)))]}
        return self._cache[epoch]

    def stream(self, epoch: int = 0, index: int = 0) -> Iterator[Batch]:
        """Batches from position ``(epoch, index)`` on, epoch after epoch, forever."""
        while True:
            batches = self.epoch(epoch)
            yield from batches[index:]
            epoch, index = epoch + 1, 0

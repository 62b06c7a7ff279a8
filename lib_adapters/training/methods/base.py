"""What the loop needs from a training method (LoRA, T2I-Adapter, IP-Adapter), and the defaults they share.

A method owns its trainable weights and how they enter the model. The loop asks it, per micro-batch
(a ``MethodBatch``): which captions to encode (``captions``: e.g. caption dropout), how to sample
timesteps (``sample_timesteps``), and what to install in the UNet around the prediction
(``unet_context``: e.g. T2I-Adapter features of the batch's conditions). Every random draw comes
from the batch's generator, the run's seeded one, so a resumed run repeats the same draws. For
mid-run samples an adapter method also gives its input of one image (``sample_conditioning``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ...arch import BaseArch
from ..backends.base import ModelInfo
from ..buckets import BatchPlan, Placement
from ..config import TrainConfig
from ..data import ImageRecord, load_records
from ..objective import sample_timesteps
from ..sampling import SampleConditioning

MODELSPEC_ARCHITECTURE = {BaseArch.SD1: "stable-diffusion-v1", BaseArch.SD2: "stable-diffusion-v2-512",
                          BaseArch.SDXL: "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class ExportInfo:
    """Facts about the run that go into the exported file's metadata."""

    config: TrainConfig
    model: ModelInfo
    step: int
    num_images: int
    tag_frequency: dict = field(default_factory=dict)
    started_at: float = 0.0
    session_id: str = ""
    records: tuple[ImageRecord, ...] = ()  # the dataset (kohya's image counts per folder, with repeats)
    plan: BatchPlan | None = None  # its batches and buckets (kohya's batches per epoch and bucket table)

    def modelspec(self, kind: str) -> dict[str, str]:
        """The ``modelspec.*`` keys (Stability's model spec) every exported file carries; ``kind`` ends the
        architecture ("lora", "t2i-adapter")."""
        c = self.config
        return {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[self.model.arch]}/{kind}",
                "modelspec.title": c.output_name,
                "modelspec.resolution": f"{c.resolution}x{c.resolution}",
                "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started_at or time.time()))}


@dataclass(frozen=True)
class MethodBatch:
    """One micro-batch as a method sees it: the samples and how each was fitted to its bucket."""

    records: list[ImageRecord]  # of each sample
    placements: list[Placement]  # of each sample: conditions get exactly the image's crop/resize
    generator: torch.Generator  # the run's seeded generator (draw dropout etc. from it: exact resume)
    device: torch.device
    # In a multi-process run ``records`` are this process's rows of a global batch: draw per-sample randomness for
    # all ``global_size`` samples and keep ``rows``, so every process's generator stays in step and each sample
    # gets what a single process would give it.
    global_size: int | None = None  # None: a single process, ``len(records)``
    rows: slice = field(default_factory=lambda: slice(None))  # (a slice is no valid dataclass default)

    @property
    def total(self) -> int:
        return len(self.records) if self.global_size is None else self.global_size


class TrainingMethod(Protocol):
    name: str

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups (fp32 parameters, each group with its "lr")."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, fp32, for checkpoints (exact resume)."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @property
    def trains_text_encoder(self) -> bool: ...

    def export(self, path: Path, info: ExportInfo, dtype: torch.dtype | None = None) -> Path:
        """Write the user-facing file atomically (in ``dtype`` if given, else the configured one); return its path."""

    def load_trainable_file(self, path: Path) -> None:
        """Load the trained tensors back from a file ``export`` wrote (used by resume)."""

    def close(self) -> None:
        """Take the method out of the model, leaving the base model as it was."""

    def captions(self, batch: MethodBatch, captions: list[str]) -> list[str]:
        """The captions to encode for this batch."""

    def unet_context(self, batch: MethodBatch) -> contextlib.AbstractContextManager:
        """Entered around ``backend.apply`` only: installs the batch's adapter inputs in the UNet."""

    def sample_timesteps(self, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """Integer timesteps of the ``n`` samples."""

    def sample_conditioning(self, records: list[ImageRecord], image: Path | None,
                            resolution: int) -> SampleConditioning | None:
        """The adapter's input for samples of ``resolution`` squared, from ``image`` (None: the first record's),
        computed with the current weights; None for methods that take no input (LoRA)."""

    def nonfinite_inputs(self, batch: MethodBatch, updated: bool, root: Path | None) -> list:
        """Only after a non-finite loss: this batch's own inputs to the UNet (adapter features, image tokens)
        recomputed, as ``nonfinite.NonFiniteInput``s for those that are NaN/inf (``updated``: whether the trained
        weights have been updated yet; ``root``: the dataset, to name files)."""


class MethodBase:
    """Defaults of the optional ``TrainingMethod`` members; every method class inherits it.

    ``from_config`` and ``load_records`` are class-level so that the loop can read (and validate) a
    method's dataset before the method is built on the model.
    """

    @classmethod
    def from_config(cls, config: TrainConfig, backend) -> "MethodBase":
        raise NotImplementedError

    @classmethod
    def load_records(cls, config: TrainConfig) -> list[ImageRecord]:
        """The run's records, validated file by file (``DatasetInvalidError`` lists every problem)."""
        return load_records(config.dataset_dir, config.min_image_size)

    def captions(self, batch: MethodBatch, captions: list[str]) -> list[str]:
        return list(captions)

    def unet_context(self, batch: MethodBatch) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sample_timesteps(self, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(n, num_train_timesteps, generator)

    def sample_conditioning(self, records: list[ImageRecord], image: Path | None,
                            resolution: int) -> SampleConditioning | None:
        return None

    def nonfinite_inputs(self, batch: MethodBatch, updated: bool, root: Path | None) -> list:
        return []  # LoRA has no inputs of its own

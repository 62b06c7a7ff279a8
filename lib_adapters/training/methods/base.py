"""What the loop needs from a training method (LoRA now; T2I-Adapter and IP-Adapter later)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..backends.base import ModelInfo
from ..config import TrainConfig


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

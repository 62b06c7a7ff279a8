"""Training errors: a run that stopped for a reason in training itself (not in the user's inputs)."""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError


class TrainingError(AdapterError):
    """Training could not go on; the message says what happened and what to try."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""

    def __init__(self, step: int, value: float, last_checkpoint: Path | None, learning_rate: float, precision: str):
        self.step = step
        self.value = value
        self.last_checkpoint = last_checkpoint
        kept = (f"the last good checkpoint {last_checkpoint} is kept unchanged" if last_checkpoint is not None
                else "no checkpoint had been saved yet")
        hints = ["use bf16 instead of fp16 (fp16 overflows easily)" if precision == "fp16" else
                 "if your GPU supports it, use bf16 mixed precision",
                 f"a lower learning rate (this run used {learning_rate:g})",
                 "turn off noise offset / min-SNR weighting if they are on"]
        super().__init__(
            f"the loss became {value} at step {step}; training stopped and {kept}. Try: " + "; ".join(hints) + ".")

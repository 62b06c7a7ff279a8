"""Training errors: a run that stopped for a reason in training itself (not in the user's inputs)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import AdapterError


class TrainingError(AdapterError):
    """Training could not go on; the message says what happened and what to try."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint.

    ``inputs``: the step's inputs that were not finite (``nonfinite.NonFiniteInput``, each with its own advice);
    empty when every input was checked and finite, so the model's prediction or the update is at fault; None when
    they were not checked (a non-finite gradient norm, or another process's rows). ``updated``: whether any update
    had been made before this step."""

    def __init__(self, step: int, value: float, last_checkpoint: Path | None, learning_rate: float, precision: str,
                 inputs: Sequence | None = None, updated: bool = True):
        self.step = step
        self.value = value
        self.last_checkpoint = last_checkpoint
        self.inputs = tuple(inputs) if inputs is not None else None
        self.updated = updated
        kept = (f"the last good checkpoint {last_checkpoint} is kept unchanged" if last_checkpoint is not None
                else "no checkpoint had been saved yet")
        if self.inputs:
            found = "; ".join(i.what for i in self.inputs)
            advice = " ".join(i.advice for i in self.inputs)
            super().__init__(f"the loss became {value} at step {step} because {found}. {advice} "
                             f"Training stopped and {kept}.")
            return
        if self.inputs is not None and not updated:
            # Finite inputs and nothing trained yet: the model's own output, not the learning rate.
            fix = ("use fp32 or bf16 instead of fp16 (an fp16 UNet overflows)" if precision == "fp16" else
                   "check the checkpoint: its UNet gives NaN/inf on finite inputs")
            super().__init__(f"the loss became {value} at step {step}, before any update, although every input of "
                             "the step (latents, the captions' conditioning, the method's features, noise) was "
                             f"finite: the model's own prediction is not finite. Training stopped and {kept}. "
                             f"Try: {fix}.")
            return
        hints = ["use bf16 instead of fp16 (fp16 overflows easily)" if precision == "fp16" else
                 "if your GPU supports it, use bf16 mixed precision",
                 f"a lower learning rate (this run used {learning_rate:g})",
                 "turn off noise offset / min-SNR weighting if they are on"]
        checked = "; every input of the step was finite, so the training diverged" if self.inputs is not None else ""
        super().__init__(f"the loss became {value} at step {step}{checked}; training stopped and {kept}. Try: "
                         + "; ".join(hints) + ".")

"""After a non-finite loss: which input of the step was not finite, and advice that fits it.

A NaN loss is not always a diverging update. In the WebUI one run stopped at step 1, before any update,
because the caption's text conditioning was NaN (the WebUI's emphasis step divides by the conditioning's
mean, which a degenerate text encoder makes 0); "lower the learning rate" was the wrong advice. So when a
loss is NaN/inf the loop hands the step's tensors (``StepInputs``: references the step held anyway, no
copies) to ``diagnose``, which looks at each input in the order data flows, row by row so that it can
name the file: the latents (VAE), each caption's conditioning (text encoder), the method's own features
(T2I-Adapter features, IP-Adapter image tokens: ``method.nonfinite_inputs``), then the noise and target.
Nothing here runs on a normal step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .data import ImageRecord

log = logging.getLogger(__name__)

_SHOWN_CAPTION = 80  # characters of a caption quoted in a message


class InputSource(str, Enum):
    LATENTS = "latents"
    CAPTION = "caption"
    FEATURES = "method features"  # T2I-Adapter features, IP-Adapter image features or tokens
    NOISE = "noise or target"


@dataclass(frozen=True)
class NonFiniteInput:
    """One input that was NaN/inf: what it is (naming the files of the affected samples) and what to do."""

    source: InputSource
    what: str
    advice: str
    files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class StepInputs:
    """One micro-batch's inputs on this process, as the step computed them (references only)."""

    batch: object  # the method's MethodBatch (records, placements, generator, device)
    captions: list[str]  # as encoded (after the method's caption dropout)
    latents: torch.Tensor
    cond: object  # a tensor [B, T, C] or an SDXL dict of per-row tensors
    noise: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


def bad_rows(tensor: torch.Tensor | None) -> list[int]:
    """Indices of the rows (first dimension) that hold a NaN or an inf."""
    if tensor is None or not torch.is_tensor(tensor) or tensor.numel() == 0:
        return []
    finite = torch.isfinite(tensor.detach())
    finite = finite.reshape(finite.shape[0], -1).all(dim=1) if finite.dim() > 0 else finite.reshape(1)
    return [i for i, ok in enumerate(finite.tolist()) if not ok]


def kind(tensors: Sequence[torch.Tensor]) -> str:
    """"NaN" if any value is NaN, else "infinite"."""
    return "NaN" if any(torch.isnan(t.detach()).any() for t in tensors if torch.is_tensor(t)) else "infinite"


def shown(path: Path | None, root: Path | None) -> str:
    """A file as a message names it: relative to the dataset when it is inside it."""
    if path is None:
        return "no file"
    if root is not None:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return str(path)


def quote_caption(text: str) -> str:
    if text == "":
        return "the empty caption (caption dropout)"
    cut = text if len(text) <= _SHOWN_CAPTION else text[:_SHOWN_CAPTION] + "..."
    return f"caption {cut!r}"


def unique(items) -> tuple:
    """``items`` without repeats, in order (a kohya repeat folder can put one image twice into a batch)."""
    return tuple(dict.fromkeys(items))


def _rows_of(cond: object) -> list[tuple[str, torch.Tensor]]:
    if isinstance(cond, Mapping):
        return [(str(k), v) for k, v in cond.items() if torch.is_tensor(v) and v.dim() > 0]
    return [("crossattn", cond)] if torch.is_tensor(cond) else []


def _latents(inputs: StepInputs, root: Path | None) -> list[NonFiniteInput]:
    rows = bad_rows(inputs.latents)
    if not rows:
        return []
    records: list[ImageRecord] = inputs.batch.records
    files = unique(records[r].path for r in rows)
    return [NonFiniteInput(
        InputSource.LATENTS, f"the latents of {', '.join(shown(f, root) for f in files)} (the VAE's encoding) are "
        f"{kind([inputs.latents[r] for r in rows])}",
        "Open that image and save it again (it may be damaged), or leave it out. A VAE running in half precision "
        "overflows on some images: run it in full precision (in the WebUI: start it with --no-half-vae) or use a "
        "VAE fixed for fp16. The learning rate is not the cause.", files)]


def _captions(inputs: StepInputs, root: Path | None, trains_text_encoder: bool, updated: bool
              ) -> list[NonFiniteInput]:
    rows = sorted({r for _, t in _rows_of(inputs.cond) for r in bad_rows(t)})
    if not rows:
        return []
    records: list[ImageRecord] = inputs.batch.records
    sources = unique((inputs.captions[r], records[r].caption_file or records[r].path) for r in rows)
    named = [f"{quote_caption(text)} ({shown(file, root)})" for text, file in sources]
    tensors = [t[r] for _, t in _rows_of(inputs.cond) for r in rows if r < t.shape[0]]
    if trains_text_encoder and updated:
        advice = ("The text encoder is being trained (its LoRA) and has been updated: lower the learning rate "
                  "(or the text encoder's), or stop training the text encoder.")
    else:
        when = "gave this before any update" if trains_text_encoder else "is not trained in this run"
        advice = (f"The text encoder {when}, so neither the learning rate nor the precision is the cause: edit or "
                  "remove that caption, and check the checkpoint's text encoder.")
    return [NonFiniteInput(InputSource.CAPTION, f"the text conditioning of {' and '.join(named)} is {kind(tensors)}",
                           advice, unique(file for _, file in sources))]


def _noise(inputs: StepInputs) -> list[NonFiniteInput]:
    parts = [("noise", inputs.noise), ("target", inputs.target), ("min-SNR weights", inputs.weights)]
    bad = [name for name, t in parts if t is not None and bad_rows(t)]
    if not bad:
        return []
    tensors = [t for name, t in parts if name in bad]
    verb = "is" if len(bad) == 1 else "are"
    return [NonFiniteInput(InputSource.NOISE, f"the {' and '.join(bad)} of the step {verb} {kind(tensors)}",
                           "The noise is drawn by the trainer itself: turn off noise offset and min-SNR weighting, "
                           "and report this if it happens again.")]


def diagnose(inputs: StepInputs, method, *, updated: bool, root: Path | None = None) -> list[NonFiniteInput]:
    """Every input of the step that is not finite, in data-flow order (empty: the inputs were all finite, so the
    model's prediction or the update is at fault). Never raises: a failure here must not hide the NaN itself."""
    found: list[NonFiniteInput] = []
    checks = (lambda: _latents(inputs, root),
              lambda: _captions(inputs, root, bool(getattr(method, "trains_text_encoder", False)), updated),
              lambda: list(method.nonfinite_inputs(inputs.batch, updated, root)),
              lambda: _noise(inputs))
    for check in checks:
        try:
            found.extend(check())
        except Exception:  # noqa: BLE001  (diagnosis is best effort; the error itself is raised by the caller)
            log.warning("could not check one input of the failed step", exc_info=True)
    return found


def weights_advice(parameters, updated: bool, init_from: Path | None, field: str, label: str) -> str:
    """What to do when a method's own module (``label``: "the T2I-Adapter") gives NaN/inf features."""
    broken = any(not torch.isfinite(p.detach()).all() for p in parameters)
    if updated:
        state = "became NaN/inf in training" if broken else "give NaN/inf after the updates so far"
        return (f"{label}'s weights {state}: lower the learning rate, and use bf16 instead of fp16 if fp16 is on.")
    if init_from is not None:
        holds = "holds NaN/inf weights" if broken else "gives NaN/inf on these inputs"
        return (f"Nothing has been trained yet, so the file it starts from ({field} = {init_from}) is at fault: it "
                f"{holds}. Choose another file, or start from scratch; the learning rate is not the cause.")
    return (f"Nothing has been trained yet: {label} gives NaN/inf as initialised; use fp32 or bf16 precision. The "
            "learning rate is not the cause.")

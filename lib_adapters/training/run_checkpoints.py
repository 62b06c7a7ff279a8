"""Checkpoints: atomic save of one training moment, and everything needed to resume it exactly.

A checkpoint at step N is two files in ``<output_dir>/<name>-checkpoints/``:

* ``<name>-stepNNNNNN.safetensors``: the method's export in fp32 (for LoRA, a complete kohya file the
  WebUI can already use) - the trainable state;
* ``<name>-stepNNNNNN.state``: ``torch.save`` of plain containers (loadable with ``weights_only=True``):
  step, data position, optimizer, scheduler and grad-scaler states, the torch / CUDA / numpy / python
  RNG states and the run's noise generator, and the settings that must not change on resume.

Each file is written to a temporary name and moved into place with ``os.replace``; the state file is
written last, so a checkpoint is complete exactly when its ``.state`` file exists. The state also holds the run's
session id (kept over resumes: it names the run in the files it publishes) and the loss of every step so far, so a
resumed run's summary covers the whole run; states written before these existed still load (``session_id`` then
comes from the checkpoint's weights file, ``losses`` is None).

A fresh run under a name that has checkpoints sets the earlier run's folder aside, under a name of its own
(``<name>-checkpoints-<time of its last write>``), so that resume never picks a stale step of another run and no
earlier checkpoint is ever deleted.
"""
from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DiskFullError, FormatError, InputError, MissingFileError
from ..formats.reader import torch_load
from .config import Method, TrainConfig
from .outputs import atomic_write, file_run_id, remove_temp_files, temp_file_pattern

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state"
_STEP = re.compile(r"-step(\d+)\.state$")


def checkpoint_dir(config: TrainConfig) -> Path:
    return config.output_dir / f"{config.output_name}-checkpoints"


def checkpoint_paths(config: TrainConfig, step: int) -> tuple[Path, Path]:
    """(trainable .safetensors, .state) for ``step``."""
    stem = checkpoint_dir(config) / f"{config.output_name}-step{step:06d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(STATE_SUFFIX)


def latest_checkpoint(config: TrainConfig) -> Path | None:
    """The ``.state`` file of the newest complete checkpoint of this run's name, or None."""
    folder = checkpoint_dir(config)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.glob(f"{config.output_name}-step*{STATE_SUFFIX}")
             if (m := _STEP.search(p.name)) and p.with_suffix(".safetensors").is_file()]
    return max(found)[1] if found else None


def set_aside_checkpoints(config: TrainConfig) -> Path | None:
    """Before a fresh run: move an earlier run's checkpoint folder of this name to a new, unused name
    (``<name>-checkpoints-<YYYYmmdd-HHMMSS>`` of its newest file, ``-2``, ``-3`` ... if taken). Returns it, or None
    when there was nothing to set aside. Nothing is deleted."""
    folder = checkpoint_dir(config)
    if not folder.is_dir():
        return None
    files = list(folder.iterdir())
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in files)))
    target, n = folder.with_name(f"{folder.name}-{stamp}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}-{stamp}-{n}")
    folder.rename(target)
    log.info("earlier checkpoints of %r set aside in %s", config.output_name, target)
    return target


def remove_checkpoint_temp_files(config: TrainConfig) -> list[Path]:
    """Temporary files a killed checkpoint write of this run's name left in its checkpoint folder."""
    name = re.escape(config.output_name)
    return remove_temp_files(checkpoint_dir(config), temp_file_pattern(name + r"-step\d+\.(?:safetensors|state)"))


def resume_signature(config: TrainConfig) -> dict:
    """Settings that decide the trained tensors' shapes or the data order: they must match on resume."""
    return {"method": config.method.value, "seed": config.seed, "batch_size": config.batch_size,
            "grad_accumulation": config.grad_accumulation, "resolution": config.resolution,
            "buckets": config.buckets, **_lora_signature(config), **_t2i_signature(config), **_ip_signature(config)}


def _lora_signature(config: TrainConfig) -> dict:
    """The LoRA network's shape (only for LoRA runs; the states of other methods' runs may still hold these keys)."""
    if config.method is not Method.LORA:
        return {}
    lora = config.lora
    return {"lora_rank": lora.rank, "lora_alpha": float(lora.alpha), "lora_targets": lora.targets.value,
            "train_text_encoder": lora.train_text_encoder}


def _t2i_signature(config: TrainConfig) -> dict:
    """The T2I-Adapter's shape and timestep sampling (only for T2I runs, so older LoRA checkpoints still match)."""
    if config.method is not Method.T2I_ADAPTER:
        return {}
    t2i = config.t2i
    return {"t2i_kind": t2i.adapter_kind.value, "t2i_condition_channels": t2i.condition_channels,
            "t2i_res_blocks": t2i.res_blocks, "t2i_timesteps": t2i.timesteps.value}


def _ip_signature(config: TrainConfig) -> dict:
    """The IP-Adapter's projection shape and dropout rates (the draws), only for IP runs; FaceID's LoRA rank and face
    models (which made the embeddings) only for FaceID runs, so older checkpoints still match."""
    if config.method is not Method.IP_ADAPTER:
        return {}
    ip = config.ip
    faceid = {"ip_lora_rank": ip.lora_rank, "ip_face_pack": ip.face_pack} if ip.faceid else {}
    return {"ip_projection": ip.projection.value, "ip_resampler_dim": ip.resampler_dim,
            "ip_resampler_depth": ip.resampler_depth, "ip_drops": [ip.image_drop, ip.text_drop, ip.both_drop],
            **faceid}


def check_signature(saved: dict, config: TrainConfig, path: Path) -> None:
    now = resume_signature(config)
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise InputError(f"cannot resume from {path}: these settings differ from the saved run ({'; '.join(changed)}). "
                         "Use the saved settings, or start a new run under another output name.")


# -- random number generators -------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
           "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                      "gauss": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """Everything about the run at a step boundary except the trainable weights."""

    step: int
    epoch: int
    batch_index: int
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict
    signature: dict
    session_id: str | None = None  # the run's id, the same over resumes (None: unknown, from an older state)
    losses: list[float] | None = None  # the loss of every step 1..step (None: an older state did not keep them)
    seconds: float = 0.0  # training time of the run up to this step, over all its sessions

    def to_dict(self) -> dict:
        out = {"format": 1, "step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
               "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler, "rng": self.rng,
               "signature": self.signature, "session_id": self.session_id, "seconds": float(self.seconds)}
        if self.losses is not None:  # 4 bytes a step
            out["losses"] = torch.tensor(self.losses, dtype=torch.float32)
        return out


def write_state(path: Path, snapshot: Snapshot) -> Path:
    """Write the ``.state`` file that completes the checkpoint whose weights were just written beside it. If the disk
    is full, those weights are removed again (they are no checkpoint without it, and hold space), unless an earlier,
    complete checkpoint of the same step owns them."""
    path = Path(path)
    complete_before = path.is_file()
    try:
        return atomic_write(path, lambda tmp: torch.save(snapshot.to_dict(), tmp))
    except DiskFullError:
        if not complete_before:
            path.with_suffix(".safetensors").unlink(missing_ok=True)
        raise


def read_state(path: Path) -> Snapshot:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; resume needs a checkpoint's {STATE_SUFFIX} file")
    if not path.is_file():
        raise MissingFileError(f"the checkpoint {path} does not exist")
    if not path.with_suffix(".safetensors").is_file():
        raise MissingFileError(f"the checkpoint {path} has no weights file {path.with_suffix('.safetensors').name}")
    try:
        data = torch_load()(path, map_location="cpu", weights_only=True)  # not the WebUI's safe.load
    except Exception as exc:
        raise FormatError(f"{path} is not a readable training state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != 1:
        raise FormatError(f"{path} is not a training state written by this extension")
    losses = data.get("losses")
    return Snapshot(data["step"], data["epoch"], data["batch_index"], data["optimizer"], data["scheduler"],
                    data["scaler"], data["rng"], data["signature"],
                    session_id=data.get("session_id") or file_run_id(path.with_suffix(".safetensors")),
                    losses=losses.tolist() if losses is not None else None, seconds=float(data.get("seconds", 0.0)))

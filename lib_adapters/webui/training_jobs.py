"""Training jobs in the WebUI process: one background run at a time, its status, interrupt and resume.

``TrainRequest`` is what the tab, the web API and scripts pass in (plain JSON-able fields, validated
with messages that name the field); ``TrainingJobs`` validates a request completely (settings, every
dataset file, the checkpoint to resume) before anything starts, then trains in a background thread
through a ``TrainingHost`` (``training_host.py``: the WebUI glue: queue lock, shared.state progress,
Lora unload/restore, Lora dir and list refresh). ``status()`` is a frozen ``JobStatus`` snapshot that
the tab polls and the API returns as JSON.

Where files go (LoRA): the finished file, and on interrupt the newest checkpoint's weights, land in
the WebUI's Lora dir as ``<output_name>.safetensors``; checkpoints (``.state`` + weights, for resume)
and sample images stay in the host's work dir (``outputs/adapters-training``), so the Lora list only
ever shows finished or interrupted LoRAs.
"""
from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Optional

import torch

from ..errors import AdapterError, InputError, MissingFileError
from ..training.checkpoints import check_signature, checkpoint_dir, latest_checkpoint, read_state
from ..training.config import LoraConfig, TrainConfig
from ..training.data import load_records
from ..training.errors import NonFiniteLossError
from ..training.loop import Progress, TrainCallbacks, train
from ..training.methods.lora_file import atomic_write, load_lora, save_lora
from .training_host import TrainingHost

log = logging.getLogger(__name__)

__all__ = ["JobState", "TrainRequest", "JobStatus", "TrainingJobs", "TrainingHost", "JobRunningError"]

LOG_LINES = 200
_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class JobState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


class JobRunningError(InputError):
    """A job is already running (the API answers 409)."""


# -- the request ----------------------------------------------------------------------------------------
_INT, _FLOAT, _BOOL, _STR, _STRS, _OPT_FLOAT = ("an integer", "a number", "true or false", "a string",
                                                "a list of strings", "a number or null")


@dataclass(frozen=True)
class TrainRequest:
    """One run's settings as a UI or API client gives them. ``to_config`` turns them into the core's config."""

    dataset_dir: str
    output_name: str
    method: str = "lora"
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    precision: str = "auto"  # bf16 on CUDA hosts (fp16 where bf16 is unsupported), fp32 on CPU
    seed: int = 0
    save_every: int = 500
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    rank: int = 16
    alpha: float = 16.0
    lora_targets: str = "attention"
    train_text_encoder: bool = False
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    buckets: bool = True

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        """Field name -> the JSON kind it takes (for messages and the API schema)."""
        kinds = {}
        for f in fields(cls):
            kinds[f.name] = {"int": _INT, "float": _FLOAT, "bool": _BOOL, "str": _STR, "tuple[str, ...]": _STRS,
                             "Optional[float]": _OPT_FLOAT}[str(f.type)]
        return kinds

    @classmethod
    def from_dict(cls, data: dict) -> "TrainRequest":
        """Build from JSON-like data; ``InputError`` naming unknown or missing fields and wrong types."""
        if not isinstance(data, dict):
            raise InputError(f"a training request must be a JSON object; got {type(data).__name__}")
        kinds = cls.field_kinds()
        unknown = sorted(k for k in data if k not in kinds)
        if unknown:
            raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are: {', '.join(kinds)}")
        missing = [k for k in ("dataset_dir", "output_name") if data.get(k) in (None, "")]
        if missing:
            raise InputError(f"missing required field(s): {', '.join(missing)}")
        values, wrong = {}, []
        for name, value in data.items():
            kind = kinds[name]
            ok, converted = _convert(kind, value)
            if not ok:
                wrong.append(f"{name} must be {kind}, got {value!r}")
            values[name] = converted
        if wrong:
            raise InputError("wrong type: " + "; ".join(wrong))
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sample_prompts"] = list(self.sample_prompts)
        return out

    def resolved_precision(self, device: torch.device | str | None = None) -> str:
        """"auto" -> bf16 on a CUDA device (fp16 if the GPU has no bf16), fp32 elsewhere."""
        if str(self.precision).lower() != "auto":
            return str(self.precision).lower()
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def to_config(self, output_dir: Path, *, device: torch.device | str | None = None) -> TrainConfig:
        """The validated core config (``InputError`` naming the field on a bad value)."""
        lora = LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.lora_targets,
                          train_text_encoder=self.train_text_encoder)
        return TrainConfig(
            dataset_dir=Path(self.dataset_dir).expanduser(), output_dir=Path(output_dir), output_name=self.output_name,
            method=self.method, resolution=self.resolution, steps=self.steps, batch_size=self.batch_size,
            grad_accumulation=self.grad_accumulation, learning_rate=self.learning_rate, lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps, optimizer=self.optimizer, precision=self.resolved_precision(device),
            seed=self.seed, save_every=self.save_every, sample_every=self.sample_every,
            sample_prompts=tuple(self.sample_prompts), sample_seed=self.seed, sample_steps=self.sample_steps,
            min_snr_gamma=self.min_snr_gamma, noise_offset=self.noise_offset,
            gradient_checkpointing=self.gradient_checkpointing, buckets=self.buckets,
            cache_latents=self.cache_latents, lora=lora)


def _convert(kind: str, value):
    """(ok, value) for one JSON value of ``kind``; no silent float->int or str->number coercion."""
    is_bool = isinstance(value, bool)
    if kind == _INT:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, int) and not is_bool, value
    if kind == _FLOAT:
        return isinstance(value, (int, float)) and not is_bool, float(value) if not is_bool and isinstance(
            value, (int, float)) else value
    if kind == _OPT_FLOAT:
        if value is None:
            return True, None
        return _convert(_FLOAT, value)
    if kind == _BOOL:
        return is_bool, value
    if kind == _STR:
        return isinstance(value, str), value
    if kind == _STRS:
        if isinstance(value, str):  # one prompt per line, as a textbox gives them
            value = [line.strip() for line in value.splitlines() if line.strip()]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else value
    return False, value


# -- the status -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobStatus:
    state: JobState = JobState.IDLE
    job_id: Optional[str] = None
    method: Optional[str] = None
    output_name: Optional[str] = None
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)
    lr: Optional[float] = None
    elapsed: float = 0.0
    eta: Optional[float] = None
    samples: list = field(default_factory=list)  # image paths, newest last
    log: list = field(default_factory=list)  # human-readable lines, newest last (bounded)
    output: Optional[str] = None  # exported file when finished (or the interrupted run's weights)
    checkpoint: Optional[str] = None  # last .state checkpoint (resumable)
    error: Optional[str] = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.value
        out["losses"] = [v if math.isfinite(v) else None for v in self.losses]
        return out


class _Job:
    """Mutable record of the current run (guarded by ``TrainingJobs._lock``)."""

    def __init__(self, request: TrainRequest, config: TrainConfig, resume_from: Path | None, id_task: str | None):
        self.request, self.config, self.resume_from, self.id_task = request, config, resume_from, id_task
        self.job_id = uuid.uuid4().hex[:12]
        self.state = JobState.RUNNING
        self.step = read_state(resume_from).step if resume_from is not None else 0
        self.first_step = self.step
        self.losses: list[float] = []
        self.lr: float | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.eta: float | None = None
        self.samples: list[str] = []
        self.log: list[str] = []
        self.output: str | None = None
        self.checkpoint: str | None = str(resume_from) if resume_from is not None else None
        self.error: str | None = None
        self.interrupt = threading.Event()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None


class _Callbacks(TrainCallbacks):
    def __init__(self, jobs: "TrainingJobs", job: _Job):
        self.jobs, self.job = jobs, job

    def on_progress(self, progress: Progress) -> None:
        job = self.job
        with self.jobs._lock:
            job.step, job.lr, job.eta = progress.step, progress.lr, progress.eta
            job.losses.append(progress.loss)
        every = max(1, job.config.steps // 20)
        if progress.step % every == 0 or progress.step == job.config.steps:
            self.jobs._log(job, f"step {progress.step}/{progress.total}: loss {progress.loss:.4f}, "
                                f"lr {progress.lr:.3g}, ETA {format_seconds(progress.eta)}")
        self.jobs.host.report(progress, job.first_step, job.request.method, job.config.output_name)

    def interrupted(self) -> bool:
        return self.job.interrupt.is_set() or self.jobs.host.interrupted()

    def on_checkpoint(self, step: int, path: Path) -> None:
        with self.jobs._lock:
            self.job.checkpoint = str(path)
        self.jobs._log(self.job, f"checkpoint at step {step}: {path}")

    def on_sample(self, step: int, images, paths) -> None:
        with self.jobs._lock:
            self.job.samples.extend(str(p) for p in paths)
        self.jobs._log(self.job, f"{len(paths)} sample image(s) at step {step}")


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# -- the jobs -----------------------------------------------------------------------------------------------
class TrainingJobs:
    """One per WebUI process (created by scripts/adapters_train.py, never at import time)."""

    def __init__(self, host: TrainingHost):
        self.host = host
        self._lock = threading.RLock()
        self._job: _Job | None = None

    # -- control --------------------------------------------------------------------------------------------
    def start(self, request: TrainRequest, *, resume: bool = False, id_task: str | None = None) -> JobStatus:
        """Validate everything, then train in a background thread. ``InputError`` (nothing started) on bad
        settings, a bad dataset (every bad file listed), no checkpoint to resume, or a job already running."""
        if isinstance(request, dict):
            request = TrainRequest.from_dict(request)
        with self._lock:
            self._check_idle()
            self.host.check_ready(request.method)
            config = request.to_config(self.host.work_dir(request.method), device=self.host.device())
            load_records(config.dataset_dir, config.min_image_size)
            resume_from = None
            if resume:
                resume_from = latest_checkpoint(config)
                if resume_from is None:
                    raise MissingFileError(
                        f"there is no checkpoint of {config.output_name!r} in {checkpoint_dir(config)} to resume; "
                        "start a new run instead")
                check_signature(read_state(resume_from).signature, config, resume_from)
            else:
                _set_aside_old_checkpoints(config)
            job = _Job(request, config, resume_from, id_task)
            self._job = job
            self.host.queue_task(id_task)
            verb = f"resuming from step {job.step} ({resume_from.name})" if resume_from else "starting"
            self._log(job, f"{verb}: {request.method} '{config.output_name}', {config.steps} steps, "
                           f"{config.precision.value}, dataset {config.dataset_dir}")
            job.thread = threading.Thread(target=self._run, args=(job,), name="adapters-training", daemon=True)
            job.thread.start()
            return self.status()

    def resume(self, request: TrainRequest, *, id_task: str | None = None) -> JobStatus:
        return self.start(request, resume=True, id_task=id_task)

    def interrupt(self) -> JobStatus:
        """The run stops before its next step, saves a checkpoint and ends INTERRUPTED."""
        with self._lock:
            job = self._job
            if job is not None and job.state is JobState.RUNNING and not job.interrupt.is_set():
                job.interrupt.set()
                self._log(job, "interrupt requested; saving a checkpoint at the end of this step")
            return self.status()

    def wait(self, timeout: float | None = None) -> JobStatus:
        job = self._job
        if job is not None:
            job.done.wait(timeout)
        return self.status()

    def status(self) -> JobStatus:
        with self._lock:
            job = self._job
            if job is None:
                return JobStatus()
            end = job.finished or time.time()
            return JobStatus(state=job.state, job_id=job.job_id, method=job.request.method,
                             output_name=job.config.output_name, step=job.step, total=job.config.steps,
                             losses=list(job.losses), lr=job.lr, elapsed=end - job.started,
                             eta=job.eta if job.state is JobState.RUNNING else None, samples=list(job.samples),
                             log=list(job.log), output=job.output, checkpoint=job.checkpoint, error=job.error)

    def _check_idle(self) -> None:
        job = self._job
        if job is not None and job.state is JobState.RUNNING:
            raise JobRunningError(f"a training job is already running ({job.request.method} '{job.config.output_name}', "
                                  f"step {job.step}/{job.config.steps}); interrupt it or wait for it to finish")

    def _log(self, job: _Job, line: str) -> None:
        log.info("adapters training: %s", line)
        with self._lock:
            job.log.append(time.strftime("%H:%M:%S ") + line)
            del job.log[:-LOG_LINES]

    # -- the run (background thread) ------------------------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        state, error = JobState.FAILED, None
        try:
            with self.host.exclusive(job.id_task, job.config.steps - job.first_step, job.request.method,
                                     job.config.output_name,
                                     on_wait=lambda: self._log(job, "waiting for the running generation to finish")):
                if job.interrupt.is_set():
                    self._log(job, "interrupted before training started")
                    state = JobState.INTERRUPTED
                    return
                backend = self.host.make_backend(job.request.method)
                with self.host.training_model(backend):
                    result = train(job.config, backend, callbacks=_Callbacks(self, job), resume_from=job.resume_from)
                with self._lock:
                    job.step = result.step
                published = self._publish(job, result)
                state = JobState.INTERRUPTED if result.interrupted else JobState.FINISHED
                where = f"{published} is in the Lora list" if published else "nothing was exported"
                self._log(job, f"{'interrupted' if result.interrupted else 'finished'} at step {result.step}; {where}")
        except NonFiniteLossError as exc:
            error = str(exc)
            with self._lock:
                if exc.last_checkpoint is not None:
                    job.checkpoint = str(exc.last_checkpoint)
        except AdapterError as exc:
            error = str(exc)
        except BaseException as exc:  # noqa: BLE001  (a thread must record every failure)
            log.error("adapters training failed:\n%s", traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                job.state = state if error is None else JobState.FAILED
                job.error = error
                job.finished = time.time()
                job.eta = None
            if error is not None:
                self._log(job, f"failed: {error}")
            job.done.set()

    def _publish(self, job: _Job, result) -> Path | None:
        """Put the run's LoRA into the Lora dir (the final file, or the newest checkpoint's weights on interrupt)
        and refresh the WebUI's Lora list."""
        config = job.config
        target = self.host.output_dir(job.request.method) / f"{config.output_name}.safetensors"
        if result.output is not None:
            source = Path(result.output)
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # never a half-copied file in the list
            source.unlink()
        elif result.step > 0 and (result.checkpoints or job.checkpoint):  # step 0: an untrained (no-op) LoRA
            state = Path(result.checkpoints[-1] if result.checkpoints else job.checkpoint)
            tensors, metadata = load_lora(state.with_suffix(".safetensors"))
            dtype = _SAVE_DTYPES[config.lora.save_precision.value]
            tensors = {k: (v.float() if k.endswith(".alpha") else v.to(dtype)) for k, v in tensors.items()}
            metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
            save_lora(target, tensors, metadata)
        else:
            return None
        with self._lock:
            job.output = str(target)
        self.host.refresh_networks(job.request.method)
        return target


def _set_aside_old_checkpoints(config: TrainConfig) -> None:
    """A fresh run under a name that has checkpoints: keep the old ones (one generation back) out of the way,
    so that "resume" never picks a stale, later step of an earlier run."""
    folder = checkpoint_dir(config)
    if folder.is_dir() and any(folder.iterdir()):
        previous = folder.with_name(folder.name + "-previous")
        if previous.exists():
            shutil.rmtree(previous)
        folder.rename(previous)
        log.info("adapters training: earlier checkpoints of %r moved to %s", config.output_name, previous)


def replace_request(request: TrainRequest, **changes) -> TrainRequest:
    """A copy with ``changes`` (validated like ``from_dict``)."""
    return TrainRequest.from_dict({**request.to_dict(), **changes}) if changes else replace(request)

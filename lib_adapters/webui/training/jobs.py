"""Training jobs in the WebUI process: one background run at a time, its status, interrupt and resume.

A thin threaded wrapper over the training core's job (``lib_adapters.training.job``: every check, the files made
ready, the run and its publishing, the same for the command line): ``TrainingJobs.start`` turns a ``TrainRequest``
into a config with the host's folders, prepares the job (nothing starts when a check fails), then trains in a
background thread through a ``TrainingHost`` (``host.py``: the WebUI glue: queue lock, shared.state progress, Lora
unload/restore, the folders and their lists). ``status()`` is a frozen ``JobStatus`` snapshot that the tab polls
and the API returns as JSON.

Where files go: the finished file, and on interrupt the weights so far, land as ``<output_name>.safetensors`` in
the WebUI's Lora dir (LoRA) or in the Adapters panel's own folder, models/adapters (T2I- and IP-Adapters), and that
list is refreshed before the queue lock is released, so the very next generation can use it. Checkpoints
(``.state`` + weights, for resume), sample images and caches stay in the host's work dir
(``outputs/adapters-training``), so the lists only ever show finished or interrupted runs.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from ...errors import AdapterError, DiskFullError, InputError
from ...training.errors import NonFiniteLossError
from ...training.job import LATEST, JobSpec, PreparedJob, disk_full_message, prepare, run
from ...training.outputs import disk_full_error
from ...training.progress import Progress, TrainCallbacks, format_duration
from ...training.request import TrainRequest
from .host import TrainingHost

log = logging.getLogger(__name__)

LOG_LINES = 200
HOW_TO_OVERWRITE = ('tick "Overwrite an existing file of this name" in the Train Adapter tab (API: "overwrite": '
                    'true)')


class JobState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


class JobRunningError(InputError):
    """A job is already running (the API answers 409)."""


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

    def __init__(self, request: TrainRequest, prepared: PreparedJob, id_task: str | None):
        self.request, self.prepared, self.config, self.id_task = request, prepared, prepared.config, id_task
        self.job_id = uuid.uuid4().hex[:12]
        self.state = JobState.RUNNING
        self.step = self.first_step = prepared.start_step
        self.losses: list[float] = []
        self.lr: float | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.eta: float | None = None
        self.samples: list[str] = []
        self.log: list[str] = []
        self.output: str | None = None
        self.checkpoint: str | None = str(prepared.resume_from) if prepared.resume_from is not None else None
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
                                f"lr {progress.lr:.3g}, ETA {format_duration(progress.eta)}")
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

    def on_warning(self, message: str) -> None:
        log.warning("adapters training: %s", message)
        self.jobs._log(self.job, f"warning: {message}")


# -- the jobs -----------------------------------------------------------------------------------------------
class TrainingJobs:
    """One per WebUI process (created by scripts/adapters_train.py, never at import time)."""

    def __init__(self, host: TrainingHost):
        self.host = host
        self._lock = threading.RLock()
        self._job: _Job | None = None

    # -- control --------------------------------------------------------------------------------------------
    def start(self, request: TrainRequest, *, resume: bool = False, id_task: str | None = None) -> JobStatus:
        """Check everything, then train in a background thread. ``InputError`` (nothing started) on bad settings, a
        bad dataset (every bad file listed), no checkpoint to resume, a taken output name, or a job already running."""
        if isinstance(request, dict):
            request = TrainRequest.from_dict(request)
        with self._lock:
            self._check_idle()
            method = request.method
            self.host.check_ready(method)
            config = request.to_config(self.host.work_dir(method), places=self.host.places(method))
            spec = JobSpec(config, self.host.output_dir(method), LATEST if resume else None, request.overwrite,
                           HOW_TO_OVERWRITE)
            job = _Job(request, prepare(spec, self.host.device(), arch=self.host.arch()), id_task)
            self._job = job
            self.host.queue_task(id_task)
            resume_from = job.prepared.resume_from
            verb = f"resuming from step {job.step} ({resume_from.name})" if resume_from else "starting"
            self._log(job, f"{verb}: {method} '{job.config.output_name}', {job.config.steps} steps, "
                           f"{job.config.precision.value}, dataset {job.config.dataset_dir}")
            for line in job.prepared.notes:
                self._log(job, line)
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
            raise JobRunningError(f"a training job is already running ({job.request.method} "
                                  f"'{job.config.output_name}', step {job.step}/{job.config.steps}); interrupt it or "
                                  "wait for it to finish")

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
                    result = run(job.prepared, backend, _Callbacks(self, job))
                with self._lock:
                    job.step = result.step
                    job.output = str(result.output) if result.output is not None else None
                if result.output is not None:
                    self.host.refresh_networks(job.request.method)
                state = JobState.INTERRUPTED if result.interrupted else JobState.FINISHED
                where = (f"{result.output} is in {self.host.list_name(job.request.method)}" if result.output
                         else "nothing was exported")
                self._log(job, f"{'interrupted' if result.interrupted else 'finished'} at step {result.step}; {where}")
        except DiskFullError as exc:
            error = self._disk_full(job, exc)
        except NonFiniteLossError as exc:
            error = " ".join(part for part in (str(exc), self.host.non_finite_advice(exc)) if part)
            with self._lock:
                if exc.last_checkpoint is not None:
                    job.checkpoint = str(exc.last_checkpoint)
        except AdapterError as exc:
            error = str(exc)
        except BaseException as exc:  # noqa: BLE001  (a thread must record every failure)
            full = disk_full_error(exc) if isinstance(exc, OSError) else None  # written outside atomic_write
            if full is not None:
                error = self._disk_full(job, full)
            else:
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

    def _disk_full(self, job: _Job, exc: DiskFullError) -> str:
        with self._lock:
            kept = job.checkpoint
        return disk_full_message(exc, kept, "Resume")

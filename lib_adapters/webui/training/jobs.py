"""Training jobs in the WebUI process: one background run at a time, its status, interrupt and resume.

``TrainRequest`` (``lib_adapters.training.request``) is what the tab, the web API and scripts pass in;
``TrainingJobs`` validates a request completely (settings, the files it names, every dataset file, the
checkpoint to resume) before anything starts, then trains in a background thread through a
``TrainingHost`` (``host.py``: the WebUI glue: queue lock, shared.state progress, Lora
unload/restore, the output folders and their lists). ``status()`` is a frozen ``JobStatus`` snapshot
that the tab polls and the API returns as JSON.

Where files go: the finished file, and on interrupt the newest checkpoint's weights, land as
``<output_name>.safetensors`` in the WebUI's Lora dir (LoRA) or in the Adapters panel's own folder,
models/adapters (T2I- and IP-Adapters), and that list is refreshed before the queue lock is released,
so the very next generation can use it. Checkpoints (``.state`` + weights, for resume), sample images
and caches stay in the host's work dir (``outputs/adapters-training``), so the lists only ever show
finished or interrupted runs.

Nothing is lost: a file of that name written by another run is replaced only when the request says
``overwrite`` (refused before the run starts, and checked again before publishing); a resumed run may
replace what it published itself when interrupted (the file's session id is the run's). A fresh run
sets an earlier run's checkpoints of the name aside under a name of their own; temporary files that a
killed run left are removed when that name's next run starts.
"""
from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from safetensors.torch import save_file

from ...errors import AdapterError, DiskFullError, InputError, MissingFileError
from ...preprocess.registry import get_preprocessor
from ...training.run_checkpoints import (check_signature, checkpoint_dir, latest_checkpoint, read_state,
                                    remove_checkpoint_temp_files, set_aside_checkpoints)
from ...training.t2i_data import load_t2i_records
from ...training.config import Method, TrainConfig
from ...training.data import DatasetInvalidError, ProblemKind
from ...training.errors import NonFiniteLossError
from ...training.loop import method_class, train
from ...training.progress import Progress, TrainCallbacks, format_duration
from ...training.sampling import check_sample_image
from ...training.methods.lora_file import load_lora, save_lora
from ...training.outputs import (OutputExistsError, atomic_write, check_replace, disk_full_error, file_run_id,
                                remove_output_temp_files)
from .host import TrainingHost
from ...training.request import FilePlaces, TrainRequest

log = logging.getLogger(__name__)

__all__ = ["JobState", "TrainRequest", "FilePlaces", "JobStatus", "TrainingJobs", "TrainingHost", "JobRunningError",
           "validate_dataset"]

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
        """Validate everything, then train in a background thread. ``InputError`` (nothing started) on bad
        settings, a bad dataset (every bad file listed), no checkpoint to resume, or a job already running."""
        if isinstance(request, dict):
            request = TrainRequest.from_dict(request)
        with self._lock:
            self._check_idle()
            self.host.check_ready(request.method)
            config = request.to_config(self.host.work_dir(request.method), places=self.host.places(request.method))
            config = replace(config, precision=config.precision.resolve(self.host.device()))
            validate_dataset(config)
            self.host.check_files(config)
            resume_from, run_id = None, None
            if resume:
                resume_from = latest_checkpoint(config)
                if resume_from is None:
                    raise MissingFileError(
                        f"there is no checkpoint of {config.output_name!r} in {checkpoint_dir(config)} to resume; "
                        "start a new run instead")
                state = read_state(resume_from)
                check_signature(state.signature, config, resume_from)
                run_id = state.session_id
            target = self._target(request, config)
            check_replace(target, run_id, request.overwrite, HOW_TO_OVERWRITE)
            cleared = self._prepare_outputs(config, target, fresh=not resume)
            job = _Job(request, config, resume_from, id_task)
            self._job = job
            self.host.queue_task(id_task)
            verb = f"resuming from step {job.step} ({resume_from.name})" if resume_from else "starting"
            self._log(job, f"{verb}: {request.method} '{config.output_name}', {config.steps} steps, "
                           f"{config.precision.value}, dataset {config.dataset_dir}")
            for line in cleared:
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
                where = (f"{published} is in {self.host.list_name(job.request.method)}" if published
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
        return f"{exc}; " + (f"Resume continues from the last good checkpoint {kept}" if kept
                             else "no checkpoint had been saved yet")

    def _target(self, request: TrainRequest, config: TrainConfig) -> Path:
        """Where the run's file is published: ``<output_name>.safetensors`` in its list's folder."""
        return self.host.output_dir(request.method) / f"{config.output_name}.safetensors"

    @staticmethod
    def _prepare_outputs(config: TrainConfig, target: Path, *, fresh: bool) -> list[str]:
        """Temporary files a killed run of this name left, removed; on a fresh run, an earlier run's checkpoints
        set aside. Returns what was done, for the log."""
        lines = [f"removed {p}, left by a run that was killed while writing it"
                 for p in remove_output_temp_files([target.parent, config.output_dir], config.output_name)
                 + remove_checkpoint_temp_files(config)]
        aside = set_aside_checkpoints(config) if fresh else None
        if aside is not None:
            lines.append(f"an earlier run's checkpoints of '{config.output_name}' are kept in {aside}")
        return lines

    def _publish(self, job: _Job, result) -> Path | None:
        """Put the run's file into its list's folder (the final file, or the newest checkpoint's weights on
        interrupt, in the save precision) and refresh that list (Lora list, or the Adapters panel's models).
        A file of another run that appeared there meanwhile is not replaced without ``overwrite``."""
        config = job.config
        target = self._target(job.request, config)
        if result.output is not None:
            source = Path(result.output)
        elif result.step > 0 and (result.checkpoints or job.checkpoint):  # step 0: an untrained (no-op) file
            source = Path(result.checkpoints[-1] if result.checkpoints else job.checkpoint).with_suffix(".safetensors")
        else:
            return None
        try:
            check_replace(target, file_run_id(source), job.request.overwrite, HOW_TO_OVERWRITE)
        except OutputExistsError as exc:
            raise OutputExistsError(f"{exc} The trained weights are kept in {source}.") from None
        if result.output is not None:
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # never a half-copied file in the list
            source.unlink()
        else:
            _publish_checkpoint(config, source, target)
        with self._lock:
            job.output = str(target)
        self.host.refresh_networks(job.request.method)
        return target


def validate_dataset(config: TrainConfig) -> None:
    """Every dataset file (``DatasetInvalidError`` lists them all) and the sample image checked before anything
    starts. A T2I run with a preprocessor is checked without making its missing conditions: that is slow work,
    done by the run."""
    check_sample_image(config.sample_image)
    if config.method is Method.T2I_ADAPTER and config.t2i.preprocessor:
        get_preprocessor(config.t2i.preprocessor)  # InputError naming the valid ones
        try:
            load_t2i_records(replace(config, t2i=replace(config.t2i, preprocessor=None)))
        except DatasetInvalidError as exc:
            problems = [p for p in exc.problems if p.kind is not ProblemKind.MISSING_CONDITION]
            if problems:
                root = config.dataset_dir if config.dataset_dir.is_dir() else config.dataset_dir.parent
                raise DatasetInvalidError(root, problems) from None
        return
    method_class(config.method).load_records(config)


def _publish_checkpoint(config: TrainConfig, weights: Path, target: Path) -> None:
    """A checkpoint's fp32 weights (the method's own file layout) as the published file, in the save precision."""
    dtype = config.save_precision.dtype
    if config.method is Method.LORA:
        tensors, metadata = load_lora(weights)
        tensors = {k: v.to(dtype) for k, v in tensors.items()}  # alphas too, as kohya saves them
        metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
        save_lora(target, tensors, metadata)
        return
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata))


def replace_request(request: TrainRequest, **changes) -> TrainRequest:
    """A copy with ``changes`` (validated like ``from_dict``)."""
    return TrainRequest.from_dict({**request.to_dict(), **changes}) if changes else replace(request)

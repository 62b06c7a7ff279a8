"""The command-line trainer: ``python -m lib_adapters.training --dataset-dir DIR --output-dir DIR --output-name NAME``
(or ``--config body.json --output-dir DIR``, the body the web API takes).

A console wrapper over the same job as the WebUI tab and the web API (``job.py``: every check, then the files made
ready, then the run, which publishes ``<output-dir>/<name>.safetensors`` at the end and on Ctrl-C) over a backend
built by ``loading.py``; options are generated from the request schema (``cli_args.py``). Launched by
``accelerate launch`` or ``torchrun`` it trains data-parallel (``distributed.py``): every process takes
its rows of each global batch and only the first one prints and writes.

Nothing is lost: an existing ``<output-dir>/<name>.safetensors`` is replaced only with ``--overwrite`` (or by a
resumed run that wrote it itself); a fresh run sets an earlier run's checkpoints of the name aside; temporary
files a killed run left are removed at the next start.

Exit codes: 0 done; 1 training stopped (non-finite loss: the message names the kept checkpoint);
2 bad input (the message says what to fix; no traceback), an existing output file among them;
3 the disk is full (the message names the file that could not be written and the free space; the
last good checkpoint is kept and ``--resume`` continues from it); 130 interrupted by Ctrl-C after
saving a checkpoint and publishing the weights so far (``--resume`` continues it). A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, DiskFullError, InputError
from .config import Method, TrainConfig
from .distributed import Shard, close, shard_from_environment
from .errors import TrainingError
from .job import LATEST, JobSpec, disk_full_message, prepare
from .job import run as run_job
from .loading import ModelSource, base_dtype, load_backend
from .loop import TrainResult
from .outputs import disk_full_error
from .progress import Progress, TrainCallbacks, format_duration
from .run_checkpoints import latest_checkpoint

EXIT_OK, EXIT_TRAINING, EXIT_INPUT, EXIT_DISK_FULL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class ConsoleCallbacks(TrainCallbacks):
    """Progress lines on the main process; Ctrl-C (SIGINT) asks for a save-and-stop at the next step."""

    def __init__(self, shard: Shard, device: torch.device, log_every: int = 1, out=None):
        self.shard, self.device, self.log_every = shard, device, max(1, log_every)
        self.out = out or sys.stdout
        self.stop_requested = False

    def request_stop(self, *_):
        if self.stop_requested:  # the second Ctrl-C: stop now (the loop still saves if it can)
            raise KeyboardInterrupt
        self.stop_requested = True
        self.say("\nCtrl-C: saving a checkpoint at the end of this step (press again to stop at once)")

    def say(self, text: str) -> None:
        if self.shard.is_main:
            print(text, file=self.out, flush=True)

    def interrupted(self) -> bool:
        return self.shard.any(self.stop_requested, self.device)  # every process stops at the same step

    def on_progress(self, p: Progress) -> None:
        if p.step % self.log_every == 0 or p.step == p.total:
            self.say(f"step {p.step}/{p.total}  loss {p.loss:.4f}  lr {p.lr:.2e}  epoch {p.epoch}  "
                     f"elapsed {format_duration(p.elapsed)}  ETA {format_duration(p.eta)}")

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.say(f"checkpoint at step {step}: {path}")

    def on_sample(self, step: int, images, paths: list[Path]) -> None:
        self.say(f"samples at step {step}: {', '.join(str(p) for p in paths)}")


@dataclass(frozen=True)
class RunRequest:
    config: TrainConfig
    source: ModelSource
    resume: str | None  # None: a new run; "latest": the newest checkpoint of the name; else a .state path
    device: str = "auto"
    log_every: int = 1
    overwrite: bool = False  # replace an existing <output-dir>/<name>.safetensors of another run


def pick_device(name: str, shard: Shard) -> torch.device:
    if shard.distributed or name == "auto":
        return shard.device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _report(result: TrainResult, request: RunRequest, say) -> None:
    """The closing summary. It covers the whole run, over its interrupts and resumes; a run resumed from a checkpoint
    that predates the loss record can only speak of the steps of this session, and says so."""
    losses, seconds = result.run_losses, result.run_seconds
    if losses is not None:
        covered = f"{len(losses)} steps in {format_duration(seconds)}" + (
            ", the whole run" if result.first_step else "")
    else:
        losses, seconds = result.losses, result.seconds
        covered = (f"steps {result.first_step + 1}..{result.step} in {format_duration(seconds)} only: the checkpoint "
                   "resumed from has no record of the earlier losses")
    if losses:
        k = max(1, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        say(f"loss: mean of the first {k} step(s) {first:.4f} -> last {k} step(s) {last:.4f} ({covered})")
    if result.interrupted:
        say(f"interrupted at step {result.step}; checkpoint {result.checkpoints[-1] if result.checkpoints else '-'}"
            + (f"; the weights so far: {result.output}" if result.output else "")
            + "; continue with the same options and --resume")
        return
    model = "the built-in tiny model" if request.source.checkpoint is None else request.source.checkpoint
    say(f"done: {result.output} (trained on {model}); {_where_it_goes(request.config)}")


def _where_it_goes(config: TrainConfig) -> str:
    """How the user gets the file into the WebUI: LoRAs go to the Lora list, adapters to the Adapters panel."""
    if config.method is Method.LORA:
        return f"copy it into the WebUI's models/Lora folder and use <lora:{config.output_name}:1> in a prompt"
    need = "a condition image" if config.method is Method.T2I_ADAPTER else "a reference image"
    return (f"copy it into the WebUI's models/adapters folder and select {config.output_name} in an Adapters unit "
            f"with {need}")


def run(request: RunRequest, shard: Shard | None = None, out=None) -> int:
    """Train as ``request`` says; returns the exit code. ``AdapterError``s propagate to ``main``."""
    shard = shard or Shard()
    config = request.config
    device = pick_device(request.device, shard)
    callbacks = ConsoleCallbacks(shard, device, request.log_every, out)
    resume = None if request.resume is None else LATEST if request.resume == "latest" else Path(request.resume)
    job = prepare(JobSpec(config, config.output_dir, resume, request.overwrite, "pass --overwrite"), device,
                  is_main=shard.is_main)  # everything checked before minutes of model loading
    for note in job.notes:
        callbacks.say(note)
    started = time.perf_counter()
    backend = load_backend(request.source, device, base_dtype(job.config.precision, device))
    where = "the built-in tiny model" if request.source.checkpoint is None else str(request.source.checkpoint)
    callbacks.say(f"loaded {where} ({backend.arch.value}, {backend.parameterization.value}-prediction) on {device} "
                  f"in {time.perf_counter() - started:.1f}s" + (f"; {shard.world_size} processes" if shard.distributed else ""))
    previous = signal.signal(signal.SIGINT, callbacks.request_stop) if _main_thread() else None
    try:
        result = run_job(job, backend, callbacks, shard=shard)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    _report(result, request, callbacks.say)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None, out=None) -> int:
    """Parse ``argv`` and train; user errors are printed as one message, never a traceback."""
    from .cli_args import build_parser, places_from_args, request_from_args

    args = build_parser().parse_args(argv)
    shard = Shard()
    config = None
    try:
        request = request_from_args(args)
        if args.output_dir is None:
            raise InputError("missing --output-dir: the folder of the trained file, its checkpoints and samples")
        config = request.to_config(args.output_dir, places=places_from_args(args))
        source = ModelSource(args.checkpoint, args.tokenizer, args.prediction_type)
        shard = shard_from_environment()
        return run(RunRequest(config, source, args.resume, args.device, args.log_every, request.overwrite), shard, out)
    except DiskFullError as exc:
        _disk_full(exc, config, shard)
        return EXIT_DISK_FULL
    except TrainingError as exc:
        _error(exc, shard)
        return EXIT_TRAINING
    except AdapterError as exc:
        _error(exc, shard)
        return EXIT_INPUT
    except OSError as exc:  # written outside atomic_write (samples, caches)
        full = disk_full_error(exc)
        if full is None:
            raise
        _disk_full(full, config, shard)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        _error("stopped by Ctrl-C; checkpoints saved so far are in <output-dir>/<name>-checkpoints (--resume continues)",
               shard)
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            close(shard)


def _disk_full(exc: DiskFullError, config: TrainConfig | None, shard: Shard) -> None:
    _error(disk_full_message(exc, latest_checkpoint(config) if config is not None else None, "--resume"), shard)


def _error(message, shard: Shard) -> None:
    if shard.is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)

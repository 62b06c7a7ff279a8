"""One training job, the same for the Train Adapter tab, the web API and the command line: ``prepare`` it (every
check, then the files made ready), ``run`` it (the loop, publishing through the method), and say a full disk in
words. The front ends add only their own glue: the WebUI's queue lock, progress and lists (``webui/training``),
the console, signals and exit codes (``cli.py``).

``prepare`` checks, in this order, raising an ``AdapterError`` and changing nothing when one fails:

1. the run's inputs (``check``): the sample image; every dataset file (a T2I dataset with a preprocessor is checked
   without making its missing conditions, a FaceID dataset without analysing its faces: slow work, done by the run);
   the files the request names (readable, of the right family); and, where the model's architecture is known, the
   CLIP vision encoder a new IP-Adapter needs (FaceID: the face models' pack);
2. the checkpoint to resume (the newest of the name, or a given ``.state``) and its settings;
3. the published file: another run's ``<name>.safetensors`` is never replaced unless ``overwrite`` (a resumed run may
   replace the one it published itself: the file names the run's session id).

Then, on the first process only, temporary files a killed run of the name left are removed and, on a fresh run, an
earlier run's checkpoints of the name are set aside (never deleted, never mixed with this run's).

``run`` publishes ``<publish_dir>/<name>.safetensors`` at the end and on an interrupt (after at least one step),
through the method's own export in the save precision. A file of another run that appeared there meanwhile is not
replaced: the job fails naming it, and the weights stay in the last checkpoint, which the message names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..arch import BaseArch
from ..catalog import EncoderCatalog
from ..errors import DiskFullError, MissingFileError
from ..preprocess.registry import get_preprocessor
from .config import Method, TrainConfig
from .data import DatasetInvalidError, ProblemKind, dataset_root
from .distributed import Shard
from .face_data import find_face_pack
from .ip_data import reference_encoder
from .loop import Publish, Trained, TrainResult, method_class, train
from .methods.ip_adapter import IPAdapterMethod
from .named_files import check_named_files
from .outputs import OutputExistsError, check_replace, remove_output_temp_files
from .progress import TrainCallbacks
from .run_checkpoints import (check_signature, checkpoint_dir, latest_checkpoint, read_state,
                              remove_checkpoint_temp_files, set_aside_checkpoints)
from .sampling import Sampler, check_sample_image
from .t2i_data import load_t2i_records

LATEST = "latest"  # resume from the newest checkpoint of the name


@dataclass(frozen=True)
class JobSpec:
    """What a front end asks for: a validated config, where the result is published, whether to resume."""

    config: TrainConfig
    publish_dir: Path  # <output_name>.safetensors goes here (the Lora folder, models/adapters, the CLI's output dir)
    resume: Path | str | None = None  # None: a fresh run; LATEST; or a checkpoint's .state file
    overwrite: bool = False  # replace an existing published file that another run wrote
    how_to_overwrite: str = "ask to overwrite"  # the front end's words for that, for the refusal's message


@dataclass(frozen=True)
class PreparedJob:
    """A job that passed every check, its files made ready; ``run`` trains it."""

    config: TrainConfig  # precision made concrete for the device
    target: Path  # the published file
    resume_from: Path | None  # the .state file to continue from
    start_step: int
    overwrite: bool
    how_to_overwrite: str
    notes: tuple[str, ...] = ()  # what preparing did to files (for the front end's log)


def check(config: TrainConfig, arch: BaseArch | None = None) -> None:
    """The run's inputs, before anything starts (``AdapterError`` naming what is wrong)."""
    check_sample_image(config.sample_image)
    check_dataset(config)
    check_named_files(config)
    ip = config.ip
    if config.method is not Method.IP_ADAPTER:
        return
    if ip.faceid:
        find_face_pack(ip)  # the face models are there (their analysis of the images is the run's work)
    elif arch is not None and ip.image_encoder is None and ip.init_from is None:
        need = reference_encoder(ip.projection, arch)  # found as the panel will find it for the trained file
        EncoderCatalog(list(ip.encoder_folders)).find(need.hidden_states, need.width, need.description)


def check_dataset(config: TrainConfig) -> None:
    """Every dataset file (``DatasetInvalidError`` lists them all). A T2I run with a preprocessor is checked without
    making its missing conditions, an IP-Adapter FaceID run without analysing its faces: that is slow work, done by
    the run before its first step."""
    if config.method is Method.IP_ADAPTER and config.ip.faceid:
        IPAdapterMethod.dataset_records(config)
        return
    if config.method is Method.T2I_ADAPTER and config.t2i.preprocessor:
        get_preprocessor(config.t2i.preprocessor)  # InputError naming the valid ones
        try:
            load_t2i_records(replace(config, t2i=replace(config.t2i, preprocessor=None)))
        except DatasetInvalidError as exc:
            problems = [p for p in exc.problems if p.kind is not ProblemKind.MISSING_CONDITION]
            if problems:
                raise DatasetInvalidError(dataset_root(config.dataset_dir), problems) from None
        return
    method_class(config.method).load_records(config)


def find_resume(config: TrainConfig, resume: Path | str | None) -> Path | None:
    """The ``.state`` file to continue from (None: a fresh run); ``MissingFileError`` when there is none."""
    if resume is None:
        return None
    folder = checkpoint_dir(config)
    if resume != LATEST:
        if not Path(resume).is_file():
            raise MissingFileError(f"the checkpoint {resume} to resume does not exist; give a .state file from "
                                   f"{folder}, or none for the newest")
        return Path(resume)
    found = latest_checkpoint(config)
    if found is None:
        raise MissingFileError(f"there is no checkpoint of {config.output_name!r} in {folder} to resume; start a new "
                               "run instead")
    return found


def prepare(spec: JobSpec, device: torch.device | str, *, arch: BaseArch | None = None,
            is_main: bool = True) -> PreparedJob:
    """Check everything, then make the files ready (see the module docstring); ``device``: where it will train."""
    config = replace(spec.config, precision=spec.config.precision.resolve(device))
    check(config, arch)
    resume_from = find_resume(config, spec.resume)
    state = read_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_signature(state.signature, config, resume_from)
    target = Path(spec.publish_dir) / f"{config.output_name}.safetensors"
    check_replace(target, state.session_id if state is not None else None, spec.overwrite, spec.how_to_overwrite)
    notes = _ready_files(config, target, fresh=state is None) if is_main else []
    return PreparedJob(config, target, resume_from, state.step if state is not None else 0, spec.overwrite,
                       spec.how_to_overwrite, tuple(notes))


def _ready_files(config: TrainConfig, target: Path, *, fresh: bool) -> list[str]:
    """Temporary files a killed run of this name left, removed; on a fresh run, an earlier run's checkpoints set
    aside. Returns what was done."""
    removed = remove_output_temp_files(dict.fromkeys([target.parent, config.output_dir]), config.output_name)
    notes = [f"removed {p}, left by a run that was killed while writing it"
             for p in removed + remove_checkpoint_temp_files(config)]
    aside = set_aside_checkpoints(config) if fresh else None
    if aside is not None:
        notes.append(f"an earlier run's checkpoints of {config.output_name!r} are kept in {aside}")
    return notes


def run(job: PreparedJob, backend, callbacks: TrainCallbacks | None = None, *, shard: Shard | None = None,
        sampler: Sampler | None = None) -> TrainResult:
    """Train the prepared job on ``backend`` (built by the front end for ``job.config``); publishes its file."""
    return train(job.config, backend, callbacks=callbacks, resume_from=job.resume_from, sampler=sampler,
                 shard=shard, publish=publisher(job))


def publisher(job: PreparedJob) -> Publish:
    """Publish a trained (or interrupted) run to ``job.target`` through the method's export, unless another run's
    file appeared there meanwhile."""
    def publish(trained: Trained) -> Path | None:
        if trained.step == 0:  # nothing trained: an untouched file would only clutter the lists
            return None
        try:
            check_replace(job.target, trained.session_id, job.overwrite, job.how_to_overwrite)
        except OutputExistsError as exc:
            kept = trained.checkpoint.with_suffix(".safetensors") if trained.checkpoint is not None else None
            raise OutputExistsError(f"{exc} The trained weights are kept in {kept}.") from None
        return trained.export(job.target)
    return publish


def disk_full_message(exc: DiskFullError, kept: Path | None, how_to_resume: str) -> str:
    """A full disk in words: the file, the free space, and the checkpoint to continue from."""
    return f"{exc}; " + (f"the last good checkpoint {kept} is kept: {how_to_resume} continues from it"
                         if kept is not None else "no checkpoint had been saved yet")

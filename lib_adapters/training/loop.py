"""The training loop: one readable pass over batches, with saves, samples, interrupt, resume and a NaN guard.

Per optimizer step: ``grad_accumulation`` batches, each encoded to latents (or read from the latent
cache), noised at uniform timesteps of the model's own schedule, predicted by the UNet under
autocast (trainable weights stay fp32), and scored by MSE against eps or v, optionally min-SNR
weighted. Then clip, step, schedule. Randomness comes from one seeded generator (noise, timesteps)
plus the global RNGs (LoRA init), all saved in checkpoints, and the batch order is a function of
(seed, epoch); so ``N`` steps + resume + ``N`` steps equals ``2N`` steps bit for bit.

``train()`` validates the dataset first, leaves the base model as it found it (``finally``), saves on
interrupt (``callbacks.interrupted()`` is polled before every step) and on errors, and never writes
after a non-finite loss: it raises ``NonFiniteLossError`` and the last good checkpoint stays as it was. The
error names the step's input that was not finite (``nonfinite.py``: latents, a caption's conditioning, the
method's features), or says that all were finite, so that its advice fits the cause. What becomes of the trained
weights is the ``publish`` hook's call (``Trained.export`` writes the method's file): by default the finished file
in the output folder; the job layer (``job.py``) publishes interrupted runs too, where the front end wants them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import InputError
from .backends.base import SizeCondition, TrainingBackend
from .buckets import BatchPlan, load_pixels
from .config import Method, Precision, TrainConfig
from .data import CAPTION_CHUNK_TOKENS, CAPTION_MAX_CHARS, CAPTION_MAX_CHUNKS, ImageRecord, tag_frequency
from .distributed import Shard
from .errors import NonFiniteLossError
from .latent_cache import LatentCache
from .methods.base import ExportInfo, MethodBase, MethodBatch, TrainingMethod
from .methods.ip_adapter import IPAdapterMethod
from .methods.lora import LoraMethod
from .methods.t2i_adapter import T2IAdapterMethod
from .nonfinite import StepInputs, diagnose
from .objective import add_noise, diffusion_loss, min_snr_weights, sample_noise, training_target
from .optim import build_optimizer, build_scheduler
from .progress import Progress, TrainCallbacks
from .run_checkpoints import (Snapshot, capture_rng, check_signature, checkpoint_paths, read_state, restore_rng,
                              resume_signature, write_state)
from .sampling import SampleRequest, Sampler, check_sample_image, euler_sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    output: Path | None  # the published file (None: nothing was published)
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this session
    checkpoints: list[Path] = field(default_factory=list)  # .state files written
    interrupted: bool = False
    seconds: float = 0.0
    # The whole run over its sessions (interrupt + resume): every step's loss (None when resumed from a checkpoint
    # older than this record: then only this session's are known) and the training time.
    run_losses: list[float] | None = None
    run_seconds: float = 0.0
    first_step: int = 0  # where this session started


@dataclass(frozen=True)
class Trained:
    """What a run hands to its publisher at the end, or when interrupted: ``export(path)`` writes the method's own
    file (in the save precision) and returns its path."""

    step: int
    interrupted: bool
    session_id: str  # the run's id, kept over resumes: the published file names it
    checkpoint: Path | None  # the .state just written (its weights are the same)
    export: Callable[[Path], Path]


Publish = Callable[[Trained], Optional[Path]]  # returns the published file, or None


def publish_finished(config: TrainConfig) -> Publish:
    """The default: a finished run's file as ``<output_dir>/<output_name>.safetensors``; an interrupted run's
    weights stay in its checkpoint (the job layer, ``job.py``, publishes those too)."""
    return lambda trained: None if trained.interrupted else trained.export(
        config.output_dir / f"{config.output_name}.safetensors")


# Each method class reads its own dataset (``load_records``) and builds itself on a model (``from_config``).
_METHODS: dict[Method, type[MethodBase]] = {Method.LORA: LoraMethod, Method.IP_ADAPTER: IPAdapterMethod,
                                          Method.T2I_ADAPTER: T2IAdapterMethod}


def method_class(method: Method) -> type[MethodBase]:
    found = _METHODS.get(Method(method))
    if found is None:
        raise InputError(f"the {Method(method).value} training method is not available in this version; "
                         f"choose one of {', '.join(m.value for m in _METHODS)}")
    return found


def build_method(config: TrainConfig, backend: TrainingBackend) -> TrainingMethod:
    return method_class(config.method).from_config(config, backend)


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=config.precision.dtype)


def _grad_scaler():
    """fp16 needs loss scaling; ``torch.amp.GradScaler("cuda")`` is newer than the WebUI's torch 2.1."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _check_precision(config: TrainConfig, backend: TrainingBackend) -> None:
    if config.precision is Precision.FP16 and backend.device.type != "cuda":
        raise InputError("fp16 mixed precision needs a CUDA GPU; choose bf16 or fp32 on this device")
    if config.precision is Precision.FP32 and backend.unet_dtype != torch.float32:
        raise InputError(f"the loaded UNet is in {backend.unet_dtype}; choose fp16 or bf16 mixed precision "
                         "(or load the model in full precision) to train in fp32")


class Trainer:
    """One run's state. Use ``train()``; this class exists so each piece stays small."""

    def __init__(self, config: TrainConfig, backend: TrainingBackend, callbacks: TrainCallbacks | None = None,
                 sampler: Sampler | None = None, shard: Shard | None = None, publish: Publish | None = None):
        # "auto" precision made concrete for the model's device (the files and logs say what was used)
        self.config = replace(config, precision=config.precision.resolve(backend.device))
        self.backend = backend
        self.shard = shard or Shard()  # this process's part of a multi-process run (see distributed.py)
        self.callbacks = callbacks or TrainCallbacks()
        self.sampler = sampler or euler_sampler
        self.publish = publish or publish_finished(self.config)
        check_sample_image(config.sample_image)  # before the records: a T2I dataset may first make its conditions
        self.records: list[ImageRecord] = method_class(config.method).load_records(config)
        self._warn_capped_captions()
        self.plan = BatchPlan(self.records, config.resolution, config.batch_size, config.seed, config.buckets)
        self.cache = (LatentCache(backend.identity(), config.cache_dir / "latents")
                      if config.cache_latents else None)
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.generator = torch.Generator()
        self.checkpoints: list[Path] = []
        self.last_checkpoint: Path | None = None
        self.started_at = time.time()
        self.session_id = uuid.uuid4().hex  # a resumed run takes its saved one: it names the run in its files
        self.losses: list[float] = []  # this session's, one per step
        self.earlier_losses: list[float] | None = []  # the sessions' before it (resume)
        self.earlier_seconds = 0.0
        self._start = time.perf_counter()

    def _warn_capped_captions(self) -> None:
        """Once per caption file (a record is one image, whatever its repeats; a JSON list is one file)."""
        if not self.shard.is_main:
            return
        for caption_file in dict.fromkeys(r.caption_file or r.path for r in self.records if r.caption_capped):
            self.callbacks.on_warning(
                f"the caption in {caption_file} is longer than the model reads: only its first {CAPTION_MAX_CHARS} "
                f"characters are used (about {CAPTION_MAX_CHUNKS} chunks of {CAPTION_CHUNK_TOKENS} tokens)")

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self, resume_from: Path | None) -> None:
        config = self.config
        _check_precision(config, self.backend)
        torch.manual_seed(config.seed)
        self.generator.manual_seed(config.seed)
        self.backend.prepare(config.gradient_checkpointing)
        self.method = build_method(config, self.backend)
        groups = self.method.parameter_groups(config.learning_rate)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(config, groups)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.scaler = _grad_scaler() if config.precision is Precision.FP16 else None
        if resume_from is not None:
            self._resume(Path(resume_from))
        self._snapshot_rng()

    def _resume(self, path: Path) -> None:
        state = read_state(path)
        check_signature(state.signature, self.config, path)
        self.method.load_trainable_file(path.with_suffix(".safetensors"))
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.step, self.epoch, self.batch_index = state.step, state.epoch, state.batch_index
        restore_rng(state.rng, self.generator)
        self.last_checkpoint = path
        self.session_id = state.session_id or self.session_id
        self.earlier_losses, self.earlier_seconds = state.losses, state.seconds

    def _snapshot_rng(self) -> None:
        """RNG states and data position at the current step boundary: what a checkpoint must hold, even one
        written after an error in the middle of the next step (which has drawn noise and batches since)."""
        self._boundary = (self.epoch, self.batch_index, capture_rng(self.generator))

    # -- data ----------------------------------------------------------------------------------------
    def _next_batch(self):
        batches = self.plan.epoch(self.epoch)
        if self.batch_index >= len(batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
            batches = self.plan.epoch(self.epoch)
        batch = batches[self.batch_index]
        self.batch_index += 1
        return batch

    def _latents(self, indices: tuple[int, ...]) -> torch.Tensor:
        out: list[torch.Tensor | None] = []
        missing = []
        for i in indices:
            placement = self.plan.placements[i]
            cached = self.cache.get(self.records[i].path, placement) if self.cache is not None else None
            out.append(cached)
            if cached is None:
                missing.append(len(out) - 1)
        if missing:
            pixels = torch.stack([load_pixels(self.records[indices[k]].path, self.plan.placements[indices[k]])
                                  for k in missing])
            encoded = self.backend.encode_images(pixels)
            for k, latent in zip(missing, encoded):
                out[k] = latent
                if self.cache is not None:
                    self.cache.put(self.records[indices[k]].path, self.plan.placements[indices[k]], latent)
        return torch.stack([t.to(self.backend.device) for t in out]).float()

    def _sizes(self, indices: tuple[int, ...]) -> list[SizeCondition]:
        sizes = []
        for i in indices:
            p = self.plan.placements[i]
            sizes.append(SizeCondition((p.original[1], p.original[0]), (p.crop_top, p.crop_left),
                                       (p.bucket.height, p.bucket.width)))
        return sizes

    # -- one step -----------------------------------------------------------------------------------
    def _method_batch(self, indices: tuple[int, ...], rows: slice) -> MethodBatch:
        local = indices[rows]
        return MethodBatch([self.records[i] for i in local], [self.plan.placements[i] for i in local],
                           self.generator, self.backend.device, len(indices), rows)

    def _loss(self, indices: tuple[int, ...]) -> tuple[torch.Tensor | None, StepInputs | None]:
        """Mean loss of this process's rows of the global batch ``indices`` (all of them in a single process),
        and the step's inputs (references, read only if the loss is not finite); (None, None) when it has no rows.
        Noise and timesteps are drawn for the whole global batch on every process, so the generators stay in step
        and each row gets what a single process would give it."""
        config, backend = self.config, self.backend
        rows = self.shard.rows(len(indices))
        local = indices[rows]
        batch = self._method_batch(indices, rows)
        latents = self._latents(local) if local else None
        alphas = backend.alphas_cumprod
        bucket = self.plan.placements[indices[0]].bucket  # latents are 4 x H/8 x W/8 in every SD family
        shape = (len(indices), *(latents.shape[1:] if latents is not None else (4, bucket.height // 8, bucket.width // 8)))
        noise = sample_noise(tuple(shape), self.generator, config.noise_offset)[rows]
        timesteps = self.method.sample_timesteps(len(indices), len(alphas), self.generator)[rows]
        captions = self.method.captions(batch, [r.caption for r in batch.records])  # draws too: even with no rows
        if latents is None:
            return None, None
        noise = noise.to(latents.device)
        noisy = add_noise(latents, noise, timesteps, alphas)
        with _autocast(config, backend.device):
            cond = backend.encode_prompts(captions, self._sizes(local), grad=self.method.trains_text_encoder)
            with self.method.unet_context(batch):
                prediction = backend.apply(noisy, timesteps.to(latents.device), cond)
        target = training_target(backend.parameterization, latents, noise, timesteps, alphas)
        weights = (min_snr_weights(timesteps, alphas, config.min_snr_gamma, backend.parameterization)
                   if config.min_snr_gamma else None)
        inputs = StepInputs(batch, captions, latents, cond, noise, target, weights)
        return diffusion_loss(prediction, target, weights), inputs

    def _optimizer_step(self) -> float:
        accumulation = self.config.grad_accumulation
        total = 0.0
        for _ in range(accumulation):
            indices = self._next_batch().records
            loss, inputs = self._loss(indices)
            share = self.shard.share(len(indices))  # 1.0 in a single process
            # the global batch's loss, the same number on every process (so all stop together on NaN)
            value = self.shard.sum(float(loss.detach()) * share if loss is not None else 0.0, self.backend.device)
            if not math.isfinite(value):
                self._fail(value, inputs if loss is not None and not math.isfinite(float(loss.detach())) else None)
            del inputs
            if loss is not None:
                scaled = (loss * share if self.shard.distributed else loss) / accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += value / accumulation
        self.shard.reduce_gradients(self.params)  # summed before unscaling and clipping: the global gradient
        self._updating = True
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            if self.scaler is None and not math.isfinite(norm):
                self._fail(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._snapshot_rng()
        self._updating = False
        return total

    def _fail(self, value: float, inputs: StepInputs | None = None) -> None:
        """Stop on a non-finite loss (or gradient norm). With the step's ``inputs`` (this process's rows were the
        non-finite ones), first find which input was not finite, so the advice fits the cause."""
        self._failed = True
        lr = self.optimizer.param_groups[0]["lr"]
        updated = self.step > 0
        found = None
        if inputs is not None:
            with _autocast(self.config, self.backend.device):  # a method recomputes its features as the step did
                found = diagnose(inputs, self.method, updated=updated, root=self.config.dataset_dir)
        raise NonFiniteLossError(self.step + 1, value, self.last_checkpoint, lr, self.config.precision.value,
                                 found, updated)

    # -- saving and samples -------------------------------------------------------------------------
    def _export_info(self) -> ExportInfo:
        return ExportInfo(self.config, self.backend.model_info(), self.step, len(self.records),
                          tag_frequency(self.records), self.started_at, self.session_id,
                          records=tuple(self.records), plan=self.plan)

    def save_checkpoint(self) -> Path:
        weights, state_path = checkpoint_paths(self.config, self.step)
        if self.shard.is_main:  # one writer; every process holds the same weights and optimizer state
            self.method.export(weights, self._export_info(), torch.float32)
            epoch, batch_index, rng = self._boundary
            losses, seconds = self._history()
            snapshot = Snapshot(self.step, epoch, batch_index, self.optimizer.state_dict(), self.scheduler.state_dict(),
                                self.scaler.state_dict() if self.scaler else None, rng, resume_signature(self.config),
                                self.session_id, losses, seconds)
            write_state(state_path, snapshot)
        self.checkpoints.append(state_path)
        self.last_checkpoint, self._checkpoint_step = state_path, self.step
        self.callbacks.on_checkpoint(self.step, state_path)
        return state_path

    def sample(self) -> list[Path]:
        c = self.config
        with _autocast(c, self.backend.device):  # the UNet as training runs it (an fp16 UNet needs autocast)
            conditioning = self.method.sample_conditioning(self.records, c.sample_image, c.resolution)
            request = SampleRequest(c.sample_prompts, c.samples_seed, c.sample_steps, c.resolution, c.resolution,
                                    conditioning=conditioning)
            images = self.sampler(self.backend, request)
        folder = c.output_dir / f"{c.output_name}-samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"step{self.step:06d}-{i}.png" for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
        self.callbacks.on_sample(self.step, images, paths)
        return paths

    # -- the run ------------------------------------------------------------------------------------
    def run(self, resume_from: Path | None = None) -> TrainResult:
        config = self.config
        self._updating, self._failed, self._checkpoint_step = False, False, None
        losses = self.losses
        start = self._start = time.perf_counter()
        first_step = None
        try:
            self._setup(resume_from)
            first_step = self.step
            while self.step < config.steps:
                if self.callbacks.interrupted():
                    if self._checkpoint_step != self.step:  # not again right after a save_every checkpoint
                        self.save_checkpoint()
                    return self._result(self._publish(interrupted=True), True, first_step)
                losses.append(self._optimizer_step())
                self._report(losses[-1], start, first_step)
                if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                    self.save_checkpoint()
                if config.sample_every and self.step % config.sample_every == 0 and self.shard.is_main:
                    self.sample()
            self.save_checkpoint()
            return self._result(self._publish(interrupted=False), False, first_step)
        except BaseException:
            if (first_step is not None and not self._failed and not self._updating and self.step > first_step
                    and self._checkpoint_step != self.step):  # (a failed publish: its checkpoint is saved)
                log.warning("training stopped by an error at step %d; saving a checkpoint first", self.step)
                with contextlib.suppress(Exception):
                    self.save_checkpoint()
            raise
        finally:
            if getattr(self, "method", None) is not None:
                self.method.close()
            self.backend.restore()

    def _publish(self, interrupted: bool) -> Path | None:
        """The run's file through its publisher (the first process only: every process holds the same weights)."""
        if not self.shard.is_main:
            return None
        return self.publish(Trained(self.step, interrupted, self.session_id, self.last_checkpoint,
                                    lambda path: self.method.export(path, self._export_info())))

    def _history(self) -> tuple[list[float] | None, float]:
        """Every step's loss and the training time of the whole run so far, over its sessions."""
        losses = None if self.earlier_losses is None else self.earlier_losses + self.losses
        return losses, self.earlier_seconds + time.perf_counter() - self._start

    def _result(self, output: Path | None, interrupted: bool, first_step: int) -> TrainResult:
        run_losses, run_seconds = self._history()
        return TrainResult(output, self.step, list(self.losses), self.checkpoints, interrupted,
                           time.perf_counter() - self._start, run_losses, run_seconds, first_step)

    def _report(self, loss: float, start: float, first_step: int) -> None:
        elapsed = time.perf_counter() - start
        done = self.step - first_step
        eta = elapsed / done * (self.config.steps - self.step) if done else 0.0
        self.callbacks.on_progress(Progress(self.step, self.config.steps, loss, self.scheduler.get_last_lr()[0],
                                            self.epoch, elapsed, eta))


def train(config: TrainConfig, backend: TrainingBackend, *, callbacks: TrainCallbacks | None = None,
          resume_from: Path | None = None, sampler: Sampler | None = None, shard: Shard | None = None,
          publish: Publish | None = None) -> TrainResult:
    """Run (or, with ``resume_from`` = a checkpoint's ``.state`` file, continue) one training run; ``shard``: this
    process's place in a multi-process run (``distributed.shard_from_environment``); ``publish``: what becomes of
    the trained weights (default ``publish_finished``; ``job.run`` publishes interrupted runs too)."""
    return Trainer(config, backend, callbacks, sampler, shard, publish).run(resume_from)

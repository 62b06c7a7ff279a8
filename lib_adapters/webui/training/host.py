"""The WebUI side of a training run: where files go, the model, the queue lock, progress and the model lists.

``TrainingJobs`` (jobs.py) calls, in this order: ``check_ready``/``work_dir``/``places``/``output_dir``/
``device``/``arch`` while the job is prepared (``training.job.prepare``); ``queue_task(id_task)`` when it accepts
a run; then, in its thread, ``exclusive(...)`` for the whole run, ``make_backend`` and ``training_model(backend)``
around the core's ``job.run()``, ``report``/``interrupted`` per step, and ``refresh_networks`` after the file is
in ``output_dir``.

* Folders are the ones the file's users read: the WebUI's Lora dir for a LoRA; for T2I- and
  IP-Adapters the Adapters panel's own folder (models/adapters, the first folder its catalog lists),
  with the panel's CLIP vision folders (models/clip_vision) for IP's encoder, models/insightface/models for
  FaceID's face models, the panel's annotator folder for T2I's preprocessor weights, and the panel's catalog
  to resolve a file to fine-tune given by its listed name. ``refresh_networks`` re-scans the Lora list or the
  panel's catalog.

* ``exclusive`` holds ``modules.call_queue.queue_lock`` (the lock every generation takes, UI and API),
  so no generation runs meanwhile and one that waits runs right after; it brackets the run with
  ``shared.state.begin/end`` and the ``modules.progress`` task bookkeeping for ``id_task``, so the
  WebUI's own progress bar (``/internal/progress``: progress and ETA from ``job_count``/``job_no``/
  ``sampling_step``/``sampling_steps`` and ``time_start``) follows the run, and its Interrupt button
  (``shared.state.interrupted``) stops it with a checkpoint saved.
* ``training_model`` unloads the built-in Lora extension's active networks first (their merged weights
  are put back from the extension's own backups, so none is baked into the trained base) and the
  loaded hypernetworks (they act in every cross-attention), remembers
  every module's train/eval mode and every parameter's ``requires_grad``, and afterwards restores all
  of it, networks included, merged again exactly as before. The core's backend freezes the base and
  undoes its gradient checkpointing; the LoRA method removes its hooks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch

from ...arch import BaseArch, detect_unet_arch
from ...catalog import ModelCatalog
from ...errors import InputError, MissingFileError
from ...face.discovery import face_models_root
from ...training.backends.ldm import LdmBackend
from ...training.config import Method
from ...training.errors import NonFiniteLossError
from ...training.progress import Progress, format_duration
from ...training.nonfinite import InputSource
from ...training.request import FilePlaces

log = logging.getLogger(__name__)


class TrainingHost:
    """The WebUI glue. ``lora_dir``/``work_dir`` override the WebUI's folders (tests, scripts)."""

    def __init__(self, *, lora_dir: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None):
        self._lora_dir = Path(lora_dir) if lora_dir is not None else None
        self._work_dir = Path(work_dir) if work_dir is not None else None

    # -- folders ---------------------------------------------------------------------------------------------------
    def output_dir(self, method: str = "lora") -> Path:
        """Where the finished file goes: for LoRA the WebUI's Lora dir (``--lora-dir``, default models/Lora); for
        adapters the panel's own folder (models/adapters), whose catalog lists the file by its name."""
        if Method(method) is not Method.LORA:
            return _panel_settings().model_dirs[0]
        if self._lora_dir is not None:
            return self._lora_dir
        from modules import shared
        lora_dir = getattr(shared.cmd_opts, "lora_dir", None)
        if not lora_dir:
            from modules import paths_internal
            lora_dir = os.path.join(paths_internal.models_path, "Lora")
        return Path(lora_dir)

    def list_name(self, method: str = "lora") -> str:
        """How the log names the list the published file appears in."""
        return "the Lora list" if Method(method) is Method.LORA else "the Adapters panel's model list"

    def places(self, method: str = "lora") -> FilePlaces:
        """The panel's folders for the files a request names (catalog names, encoders, preprocessor weights), and
        the WebUI's models/insightface/models, where insightface (and sd-webui-controlnet) keep the face models."""
        cfg = _panel_settings()
        catalog = ModelCatalog(cfg.model_dirs, cfg.shared_model_dirs)  # a fresh scan: exactly what is there now
        return FilePlaces(catalog.resolve, tuple(cfg.encoder_dirs), cfg.annotator_dir, face_models_root(cfg.models_dir))

    def work_dir(self, method: str = "lora") -> Path:
        """Checkpoints, samples and the latent cache: ``<outputs>/adapters-training`` (never scanned as models)."""
        if self._work_dir is not None:
            return self._work_dir
        from modules import paths_internal
        return Path(paths_internal.default_output_dir) / "adapters-training"

    # -- the model ----------------------------------------------------------------------------------------------------
    def _sd_model(self):
        from modules import shared
        model = shared.sd_model
        if model is None:
            raise MissingFileError("no Stable Diffusion checkpoint is loaded; load one in the WebUI first")
        return model

    def check_ready(self, method: str = "lora") -> None:
        self.output_dir(method)
        model = self._sd_model()
        if getattr(model, "lowvram", False):  # set by modules.lowvram.setup_for_low_vram
            raise InputError(
                "training in the WebUI needs the whole model on the GPU, but this WebUI runs with --medvram or "
                "--lowvram, which moves model parts between CPU and GPU during every step. Restart the WebUI "
                "without those flags to train here, or use the command-line trainer.")

    def arch(self) -> BaseArch:
        """The loaded model's base architecture (the CLIP vision encoder a new IP-Adapter needs depends on it)."""
        return detect_unet_arch(self._sd_model().model.diffusion_model)

    def device(self) -> torch.device:
        model = self._sd_model()
        return next(model.model.diffusion_model.parameters()).device

    def make_backend(self, method: str = "lora") -> LdmBackend:
        from modules import shared
        return LdmBackend(self._sd_model(), clip_skip=getattr(shared.opts, "CLIP_stop_at_last_layers", None))

    @contextlib.contextmanager
    def training_model(self, backend: LdmBackend):
        """Active LoRAs unloaded, modes and flags remembered; everything as it was afterwards."""
        model = backend.sd_model
        networks_state = None
        try:
            with kept_as_it_was([model], backend.unet):
                networks_state = unload_networks(model)
                hypernetworks = _unload_hypernetworks()
                try:
                    yield
                finally:
                    _restore_hypernetworks(hypernetworks)
        finally:
            restore_networks(networks_state)

    # -- exclusivity and progress -------------------------------------------------------------------------------
    def queue_task(self, id_task: str | None) -> None:
        """Register ``id_task`` as queued (the WebUI's progress poller shows "In queue" until the run starts)."""
        if id_task:
            from modules import progress
            progress.add_task_to_queue(id_task)

    @contextlib.contextmanager
    def exclusive(self, id_task: str | None, steps: int, method: str, output_name: str, on_wait=None):
        """Hold the WebUI's queue lock for the whole run, with shared.state and the task bookkeeping.
        ``on_wait()`` is called first when the lock is taken (a generation is running)."""
        from modules import call_queue, progress, shared
        lock = call_queue.queue_lock
        if not lock.acquire(blocking=False):  # FIFOLock.acquire(blocking) as threading.Lock's
            if on_wait is not None:
                on_wait()
            lock.acquire()
        with contextlib.ExitStack() as release:
            release.callback(lock.release)
            state = shared.state
            state.begin(job=id_task or "adapters-training")
            state.job_count = 1
            state.job_no = 0
            state.sampling_step = 0
            state.sampling_steps = max(1, steps)
            state.textinfo = f"Training {method} '{output_name}': starting"
            progress.start_task(id_task)
            try:
                yield
            finally:
                progress.finish_task(id_task)
                state.textinfo = None
                state.interrupted = False
                state.skipped = False
                state.end()

    def report(self, p: Progress, first_step: int, method: str, output_name: str) -> None:
        """One optimizer step done: the progress bar (this session's steps, so its ETA is right after a resume)."""
        from modules import shared
        state = shared.state
        state.sampling_step = p.step - first_step
        state.sampling_steps = max(1, p.total - first_step)
        state.textinfo = (f"Training {method} '{output_name}': step {p.step}/{p.total}, loss {p.loss:.4f}, "
                          f"ETA {format_duration(p.eta)}")

    def interrupted(self) -> bool:
        """The WebUI's Interrupt button (shared.state.interrupt())."""
        from modules import shared
        return bool(shared.state.interrupted)

    def non_finite_advice(self, error: NonFiniteLossError) -> str:
        """What the WebUI's own settings have to do with a non-finite input: a caption's conditioning goes through
        the WebUI's emphasis step, whose "Original" mode divides by the conditioning's mean (``sd_emphasis``); a
        text encoder whose output has mean 0 turns every caption into NaN there."""
        if not any(i.source is InputSource.CAPTION for i in error.inputs or ()):
            return ""
        from modules import shared
        mode = str(getattr(shared.opts, "emphasis", "Original"))
        if mode != "Original":
            return (f'In this WebUI "Emphasis mode" is "{mode}", which does not rescale the conditioning, so the '
                    "emphasis step is not the cause.")
        return ('In this WebUI, Settings > Stable Diffusion > "Emphasis mode" (option `emphasis`) is "Original": it '
                "rescales each caption's conditioning by its mean, which gives NaN when the text encoder makes that "
                'mean 0. Set it to "No norm" or "None" and start the run again.')

    # -- the lists ----------------------------------------------------------------------------------------------------
    def refresh_networks(self, method: str = "lora") -> None:
        """Re-scan the Lora dir so ``<lora:name:1>`` works in the very next generation; for an adapter, the
        panel's catalog (its model dropdowns and name resolution) so a unit can select the file by its name."""
        if Method(method) is not Method.LORA:
            try:
                from .. import panel  # the WebUI's gradio and scripts modules: only here, when an adapter was trained
                panel.resources().model_choices(refresh=True)
            except Exception:  # noqa: BLE001  (the file is published; the catalog also re-scans on an unknown name)
                log.warning("adapters training: could not refresh the Adapters panel's model list", exc_info=True)
            return
        networks = _lora_extension()
        if networks is not None:
            networks.list_available_networks()


@contextlib.contextmanager
def kept_as_it_was(roots: list, unet):
    """Every module's train/eval mode and every parameter's ``requires_grad`` under ``roots``, and the instance
    forwards of ``unet``'s modules, put back as they were when the block ends."""
    modes = [(m, m.training) for root in roots for m in root.modules()]
    flags = [(p, p.requires_grad) for root in roots for p in root.parameters()]
    forwards = [(m, m.__dict__.get("forward")) for m in unet.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, forward in forwards:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward
            for param, flag in flags:
                param.requires_grad_(flag)
            for module, mode in modes:
                module.training = mode


def _panel_settings():
    from ..panel import settings
    return settings.current()


def _unload_hypernetworks():
    """Loaded hypernetworks (``<hypernet:...>``) stay in ``shared.loaded_hypernetworks`` after a generation and
    act in every cross-attention forward: take them out for the run, like the LoRAs."""
    from modules import shared
    loaded = getattr(shared, "loaded_hypernetworks", None)
    if not loaded:
        return None
    saved = list(loaded)
    loaded.clear()
    return loaded, saved


def _restore_hypernetworks(state) -> None:
    if state is not None:
        loaded, saved = state
        loaded[:] = saved


def _lora_extension():
    """The built-in Lora extension's ``networks`` module when it is loaded (it is a top-level module there)."""
    module = sys.modules.get("networks")
    if module is not None and hasattr(module, "loaded_networks") and hasattr(module, "list_available_networks"):
        return module
    return None


def _network_layers(model) -> list:
    return [m for m in model.modules() if getattr(m, "network_layer_name", None) is not None]


def unload_networks(model):
    """Take the active LoRAs out: ``loaded_networks`` emptied and every merged layer put back from the extension's
    backup, as the extension itself does when a prompt has no ``<lora:...>``. Returns what ``restore_networks`` needs."""
    networks = _lora_extension()
    if networks is None:
        return None
    saved = list(networks.loaded_networks)
    merged = [m for m in _network_layers(model) if getattr(m, "network_current_names", ())]
    if not saved and not merged:
        return None
    log.info("adapters training: unloading %d active Lora network(s) for the run: %s", len(saved),
             ", ".join(getattr(n, "name", "?") for n in saved))
    networks.loaded_networks.clear()
    with torch.no_grad():
        for layer in merged:
            networks.network_apply_weights(layer)
    return networks, saved, merged


def restore_networks(state) -> None:
    """Put the user's active LoRAs back, merged again into the layers that had them."""
    if state is None:
        return
    networks, saved, merged = state
    networks.loaded_networks[:] = saved
    with torch.no_grad():
        for layer in merged:
            networks.network_apply_weights(layer)

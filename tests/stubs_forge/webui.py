"""Switch the A1111 stub WebUI (``tests/stubs/modules``) to Forge's behaviour, and back.

``install(flavour, tiny_model)`` ("main" or "classic"):

- puts ``hosts/<flavour>`` first on ``sys.path`` (``modules_forge`` with its ``forge_version``, and
  ``backend`` for main or ``ldm_patched`` for Classic), which is how the extension tells the hosts apart;
- wraps the tiny model's UNet in a ``KModel`` held by a ``UnetPatcher`` and sets ``forge_objects``,
  ``forge_objects_original`` and ``forge_objects_after_applying_lora``: on Classic on the tiny model itself
  (its ``model.diffusion_model`` is the patcher's UNet), on main on a ``ForgeEngine`` that becomes
  ``shared.sd_model`` and has no ``.model`` (main's ``ForgeDiffusionEngine``);
- makes the processing lifecycle Forge's: ``forge_objects`` reset to the original before
  ``before_process_batch`` and to ``after_applying_lora`` before ``process_batch`` and before every
  ``process_before_every_sampling``; in main's hires pass the scripts' hook runs once before that reset
  (its clone is thrown away) and once after it; Classic runs it once, after the reset;
- makes the samplers load the pass's UNet patcher before sampling (``sampling_prepare``: weight patches
  take effect) and the CFG denoiser Forge's: ``on_cfg_denoiser`` with one row per image, then the sampling
  function on the current ``forge_objects.unet`` (uncond first); ``skip_early_cond`` as main checks it
  (``> 0``) or as Classic does (``0 <= step/total <= skip``, true at step 0 with the default 0).

On main the UNet's ``nn.Linear`` layers become main's ``ForgeOperations.Linear`` (plain modules holding the same
parameters, ``unet.OperationsLinear``), as main builds its UNet.

``uninstall()`` puts everything back (and unloads the loaded patchers so the weights are the originals).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from modules import prompt_parser, scripts, sd_samplers_cfg_denoiser, sd_samplers_common, sd_samplers_kdiffusion, shared
from modules.script_callbacks import AfterCFGCallbackParams, CFGDenoiserParams, cfg_after_cfg_callback, cfg_denoiser_callback
from modules.shared import opts, state

from . import unet as forge_unet
from .patcher import CLASSIC, MAIN, memory, unet_patcher_class
from .sampling import KModel, sampling_cleanup, sampling_function, sampling_prepare

HOSTS = Path(__file__).resolve().parent / "hosts"
_HOST_PACKAGES = ("modules_forge", "backend", "ldm_patched")


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeEngine:
    """Forge main's ``ForgeDiffusionEngine`` over the tiny model: ``forge_objects``, no ``.model``,
    ``first_stage_model``/``cond_stage_model`` None; conditioning, VAE and checkpoint info from the tiny model."""

    def __init__(self, tiny: Any):
        self.__dict__["tiny"] = tiny
        self.first_stage_model = None
        self.cond_stage_model = None
        self.current_lora_hash = str([])

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError("'ForgeDiffusionEngine' object has no attribute 'model'")
        return getattr(self.__dict__["tiny"], name)


def _purge_host_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _HOST_PACKAGES:
            del sys.modules[name]


class ForgeStub:
    def __init__(self, flavour: str, tiny: Any):
        assert flavour in (MAIN, CLASSIC)
        self.flavour, self.tiny = flavour, tiny
        self.predictor = sd_samplers_kdiffusion.CompVisDenoiser(tiny)
        unet = unet_patcher_class(flavour)(KModel(tiny.model.diffusion_model, self.predictor))
        self.base_unet = unet
        self.model = tiny if flavour == CLASSIC else ForgeEngine(tiny)
        self.model.forge_objects = ForgeObjects(unet)
        self.model.forge_objects_original = ForgeObjects(unet)
        self.model.forge_objects_after_applying_lora = ForgeObjects(unet)
        self._undo: list = []
        self._linears: list = []
        self.calls: list[str] = []  # process_before_every_sampling calls: "discarded" (main hires 1st) / "used"

    # helpers --------------------------------------------------------------------------------
    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def reset_unet(self) -> None:
        self.model.forge_objects = self.model.forge_objects_after_applying_lora.shallow_copy()

    # install --------------------------------------------------------------------------------
    def install(self) -> "ForgeStub":
        _purge_host_modules()
        sys.path.insert(0, str(HOSTS / self.flavour))
        if self.flavour == MAIN:
            self._previous_model = shared.sd_model
            shared.sd_model = self.model
            self._linears = forge_unet.use_operations_linears(self.tiny.model.diffusion_model)
        stub = self
        runner = scripts.ScriptRunner
        before_process_batch, process_batch, before_every = (
            runner.before_process_batch, runner.process_batch, runner.process_before_every_sampling)

        def forge_before_process_batch(self, p, **kwargs):
            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            before_process_batch(self, p, **kwargs)

        def forge_process_batch(self, p, **kwargs):
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            process_batch(self, p, **kwargs)

        def forge_process_before_every_sampling(self, p, **kwargs):
            if stub.flavour == MAIN and p.is_hr_pass:  # main's hires pass: once before the reset, thrown away
                stub.calls.append("discarded")
                before_every(self, p, **kwargs)
            stub.reset_unet()
            stub.calls.append("used")
            before_every(self, p, **kwargs)

        self._patch(runner, "before_process_batch", forge_before_process_batch)
        self._patch(runner, "process_batch", forge_process_batch)
        self._patch(runner, "process_before_every_sampling", forge_process_before_every_sampling)

        sampler = sd_samplers_kdiffusion.KDiffusionSampler
        for name in ("sample", "sample_img2img"):
            self._patch(sampler, name, _with_sampling_prepare(getattr(sampler, name)))
        if self.flavour == MAIN:  # main's Sampler sets conditioning_key = 'crossattn' without reading sd_model.model
            init = sd_samplers_common.Sampler.__init__

            def sampler_init(self, funcname):
                engine = shared.sd_model
                engine.__dict__["model"] = None
                try:
                    init(self, funcname)
                finally:
                    engine.__dict__.pop("model", None)
                self.conditioning_key = "crossattn"

            self._patch(sd_samplers_common.Sampler, "__init__", sampler_init)
        self._patch(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", _cfg_forward(self.flavour))
        return self

    def uninstall(self) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        memory.clear()
        forge_unet.restore_linears(self._linears)
        self._linears = []
        if self.flavour == MAIN:
            shared.sd_model = self._previous_model
        else:
            for name in ("forge_objects", "forge_objects_original", "forge_objects_after_applying_lora"):
                self.tiny.__dict__.pop(name, None)
        if str(HOSTS / self.flavour) in sys.path:
            sys.path.remove(str(HOSTS / self.flavour))
        _purge_host_modules()


_MISSING = object()


def install(flavour: str, tiny: Any) -> ForgeStub:
    return ForgeStub(flavour, tiny).install()


def _with_sampling_prepare(sample):
    def forge_sample(self, p, x, *args, **kwargs):
        unet = shared.sd_model.forge_objects.unet
        sampling_prepare(unet, x)
        try:
            return sample(self, p, x, *args, **kwargs)
        finally:
            sampling_cleanup(unet)

    return forge_sample


def _cfg_forward(flavour: str):
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if any(len(conds) != 1 for conds in conds_list):
            raise NotImplementedError("the Forge stub does not compose AND prompts")
        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        progress = self.step / self.total_steps
        if flavour == CLASSIC:
            skip_early = 0.0 <= progress <= opts.skip_early_cond
        else:
            skip_early = opts.skip_early_cond > 0 and progress <= opts.skip_early_cond
        if skip_early:
            cond_scale = 1.0
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
        denoised = sampling_function(self, params, cond_scale)
        if self.mask is not None:
            blended = denoised * self.nmask + self.init_latent * self.mask
            if self.p.scripts is not None:
                mba = scripts.MaskBlendArgs(denoised, self.nmask, self.init_latent, self.mask, blended, denoiser=self,
                                            sigma=sigma)
                self.p.scripts.on_mask_blend(self.p, mba)
                blended = mba.blended_latent
            denoised = blended
        self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(denoised)
        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        self.step += 1
        return after.x

    return forward

"""Fake of Forge's k-model wrapper (main ``backend/modules/k_model.py``, Classic ``model_base.BaseModel``)
and sampling function (main ``backend/sampling/sampling_function.py``, Classic ``ldm_patched/modules/
samplers.py`` + ``modules_forge/forge_sampler.py``).

``sampling_function(denoiser, params, cond_scale)`` reads the *current* ``forge_objects.unet`` of the
denoiser's model at every step (its ``model_options`` and ControlNet list), runs the conditioning
modifiers, skips the uncond when ``cond_scale`` is 1 (unless ``disable_cfg1_optimization``), and
``calc_cond_uncond_batch`` runs the chunks: the candidate list ``[(cond, 0), (uncond, 1)]`` batched in
reverse, so one call has rows uncond first (``cond_or_uncond == [1, 0]``), unless ``MAX_CHUNKS_PER_CALL``
(the stub's stand-in for Forge's free-memory check) splits them into separate calls. Each call gets a
shallow copy of ``model_options["transformer_options"]`` plus ``cond_or_uncond``, ``sigmas`` (the step's
``[B]`` sigmas), ``cond_mark`` (1.0 on uncond rows) and ``cond_indices``/``uncond_indices``, then
``control.get_control(...)`` for a ControlNet list, then ``model_function_wrapper`` or
``model.apply_model``. CFG: ``uncond + (cond - uncond) * cond_scale``.

``KModel.apply_model`` scales the input (``c_in``), turns sigma into the timestep and the UNet's eps
into the denoised latent with the same k-diffusion ``CompVisDenoiser`` arithmetic the A1111 stub uses,
so both hosts compute the same thing for the same UNet output.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import unet as forge_unet
from .patcher import memory

MAX_CHUNKS_PER_CALL: int | None = None  # None: as many as can be concatenated; 1: one chunk per UNet call


class KModel(nn.Module):
    """``.diffusion_model`` (the shared UNet module) and ``.predictor`` (the sigma <-> timestep schedule)."""

    def __init__(self, diffusion_model: nn.Module, predictor: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor_ref = [predictor]  # not a submodule: its buffers are not model parameters

    @property
    def predictor(self):
        return self.predictor_ref[0]

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat=None, c_crossattn=None, control=None,
                    transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        sigma = t
        c_out, c_in = (s[(...,) + (None,) * (x.ndim - 1)] for s in self.predictor.get_scalings(sigma))
        xc = x * c_in
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        timestep = self.predictor.sigma_to_t(sigma).float()
        eps = forge_unet.unet_forward(self.diffusion_model, xc, timestep, context=c_crossattn, control=control,
                                      transformer_options={} if transformer_options is None else transformer_options,
                                      **kwargs).float()
        return x + eps * c_out


def _crossattn(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def call_options(model_options: dict, cond_or_uncond: list[int], sigma: torch.Tensor) -> dict:
    """One UNet call's ``transformer_options``: a shallow copy of the patcher's plus the call's rows."""
    to = dict(model_options.get("transformer_options", {}))
    rows = sigma.shape[0]
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["sigmas"] = sigma
    to["cond_mark"] = torch.tensor([float(role) for role in cond_or_uncond for _ in range(rows)]).to(sigma)
    to["cond_indices"] = [i * rows + r for i, role in enumerate(cond_or_uncond) if role == 0 for r in range(rows)]
    to["uncond_indices"] = [i * rows + r for i, role in enumerate(cond_or_uncond) if role == 1 for r in range(rows)]
    return to


def calc_cond_uncond_batch(model: KModel, cond: dict, uncond: dict | None, x: torch.Tensor, sigma: torch.Tensor,
                           model_options: dict, control: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    out_cond = torch.zeros_like(x)
    out_uncond = torch.zeros_like(x)
    to_run = [(cond, 0)] + ([(uncond, 1)] if uncond is not None else [])
    while to_run:
        first = to_run[0][0]["c_crossattn"]
        batchable = [i for i, (c, _) in enumerate(to_run) if c["c_crossattn"].shape == first.shape]
        batchable.reverse()
        if MAX_CHUNKS_PER_CALL is not None:
            batchable = batchable[:MAX_CHUNKS_PER_CALL]
        chunks = [to_run.pop(i) for i in batchable]
        cond_or_uncond = [role for _, role in chunks]
        input_x = torch.cat([x] * len(chunks))
        timestep = torch.cat([sigma] * len(chunks))
        c: dict[str, Any] = {"c_crossattn": torch.cat([chunk["c_crossattn"] for chunk, _ in chunks])}
        to = c["transformer_options"] = call_options(model_options, cond_or_uncond, sigma)
        if control is not None:
            pointer = control
            while pointer is not None:
                pointer.transformer_options = to
                pointer = pointer.previous_controlnet
            c["control"] = control.get_control(input_x, timestep, dict(c), len(cond_or_uncond))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep, **c)
        for role, out in zip(cond_or_uncond, output.chunk(len(chunks))):
            (out_cond if role == 0 else out_uncond).copy_(out)
    return out_cond, out_uncond


def sampling_function(denoiser: Any, params: Any, cond_scale: float) -> torch.Tensor:
    unet_patcher = denoiser.inner_model.inner_model.forge_objects.unet
    model_options = unet_patcher.model_options
    model, x, sigma = unet_patcher.model, params.x, params.sigma
    cond = {"c_crossattn": _crossattn(params.text_cond)}
    uncond = {"c_crossattn": _crossattn(params.text_uncond)}
    seed = denoiser.p.seeds[0] if denoiser.p is not None else 0
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, sigma, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, sigma, uncond, cond, cond_scale, model_options, seed)
    skip_uncond = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, None if skip_uncond else uncond, x, sigma,
                                                    model_options, unet_patcher.controlnet_linked_list)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def sampling_prepare(unet_patcher: Any, x: torch.Tensor) -> None:
    """Load the pass's UNet patcher (its weight patches take effect) and let its ControlNets prepare."""
    memory.load(unet_patcher)
    for extra in unet_patcher.extra_model_patchers_during_sampling:
        memory.load(extra)
    for cnet in unet_patcher.list_controlnets():
        cnet.pre_run(unet_patcher.model)


def sampling_cleanup(unet_patcher: Any) -> None:
    for cnet in unet_patcher.list_controlnets():
        cnet.cleanup()

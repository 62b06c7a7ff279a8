"""Fake of ``modules/sd_samplers_cfg_denoiser.py``: the classifier-free-guidance denoiser.

Faithful to v1.10.1 for what an extension can observe:
1. ``state.interrupted``/``skipped`` -> ``InterruptedException`` at the start of a call;
2. UNet rows: every cond row (an image's AND sub-prompts are consecutive rows) **then** one uncond
   row per image; ``sigma``/``image_cond`` laid out the same way;
3. ``cfg_denoiser_callback(CFGDenoiserParams(..., denoiser=self))`` before the UNet (fields may be
   replaced); uncond skipped by ``opts.skip_early_cond`` or NGMS ``s_min_uncond`` (odd steps unless
   ``s_min_uncond_all``); ``pad_cond_uncond(_v0)`` padding;
4. ``opts.batch_cond_uncond`` -> one ``inner_model`` call; otherwise chunks of ``batch_size`` rows;
   different cond/uncond token lengths -> cond chunks then a separate uncond call;
5. ``cfg_denoised_callback``, CFG combination, inpaint mask blend (``on_mask_blend``),
   ``cfg_after_cfg_callback``, ``step += 1``.
Instruct-pix2pix (edit) models, ``crossattn-adm`` models and the refiner switch are not modelled.
"""
from __future__ import annotations

import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import (
    AfterCFGCallbackParams, CFGDenoisedParams, CFGDenoiserParams, cfg_after_cfg_callback, cfg_denoised_callback,
    cfg_denoiser_callback,
)
from modules.shared import opts, state


def catenate_conds(conds: list):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()}


def subscript_cond(cond, a: int, b: int):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def pad_cond(tensor, repeats: int, empty: torch.Tensor):
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], dim=1)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


def _crossattn(cond) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _rows(t: torch.Tensor, repeats: list[int], tail: torch.Tensor) -> torch.Tensor:
    """Image i's row repeated ``repeats[i]`` times, for every image, then ``tail``."""
    return torch.cat([torch.stack([t[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [tail])


class CFGDenoiser(torch.nn.Module):
    """Wraps the eps-model denoiser; ``inner_model`` is provided by the sampler-specific subclass."""

    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        """number of steps as specified by the user"""
        self.total_steps = None
        """expected number of denoiser calls for this sampling run"""
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0  # sic
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False

    @property
    def inner_model(self):
        raise NotImplementedError()

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (_crossattn(cond).shape[1] - _crossattn(uncond).shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        vec = _crossattn(uncond)
        target = _crossattn(cond).shape[1]
        if vec.shape[1] < target:
            vec = torch.hstack([vec, vec[:, -1:].repeat([1, target - vec.shape[1], 1])])
            self.padded_cond_uncond_v0 = True
        elif vec.shape[1] > target:
            vec = vec[:, :target]
            self.padded_cond_uncond_v0 = True
        if isinstance(uncond, dict):
            uncond["crossattn"] = vec
        else:
            uncond = vec
        return cond, uncond

    def _apply_blend(self, current_latent, sigma):
        blended = current_latent * self.nmask + self.init_latent * self.mask
        if self.p.scripts is not None:
            from modules import scripts
            mba = scripts.MaskBlendArgs(current_latent, self.nmask, self.init_latent, self.mask, blended, denoiser=self, sigma=sigma)
            self.p.scripts.on_mask_blend(self.p, mba)
            blended = mba.blended_latent
        return blended

    def _skip_uncond(self, sigma, s_min_uncond) -> bool:
        if opts.skip_early_cond != 0.0 and self.step / self.total_steps <= opts.skip_early_cond:
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
            return True
        if (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all
            return True
        return False

    def _run_model(self, x_in, sigma_in, image_cond_in, tensor, uncond, batch_size, skip_uncond, make_cond):
        if _crossattn(tensor).shape[1] == _crossattn(uncond).shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                return self.inner_model(x_in, sigma_in, cond=make_cond(cond_in, image_cond_in))
            x_out = torch.zeros_like(x_in)
            for a in range(0, x_out.shape[0], batch_size):
                b = a + batch_size
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_cond(subscript_cond(cond_in, a, b), image_cond_in[a:b]))
            return x_out
        x_out = torch.zeros_like(x_in)
        chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
        rows = _crossattn(tensor).shape[0]
        for a in range(0, rows, chunk):
            b = min(a + chunk, rows)
            x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_cond(subscript_cond(tensor, a, b), image_cond_in[a:b]))
        n = _crossattn(uncond).shape[0]
        x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make_cond(uncond, image_cond_in[-n:]))
        return x_out

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if isinstance(uncond, dict):
            make_cond = lambda c_crossattn, c_concat: {**c_crossattn, "c_concat": [c_concat]}  # noqa: E731
        else:
            make_cond = lambda c_crossattn, c_concat: {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}  # noqa: E731

        if self.mask_before_denoising and self.mask is not None:
            x = self._apply_blend(x, sigma)

        batch_size = len(conds_list)
        repeats = [len(conds) for conds in conds_list]
        x_in = _rows(x, repeats, x)
        sigma_in = _rows(sigma, repeats, sigma)
        image_cond_in = _rows(image_cond, repeats, image_cond)

        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = self._skip_uncond(sigma, s_min_uncond)
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if _crossattn(tensor).shape[1] != _crossattn(uncond).shape[1]:
            if opts.pad_cond_uncond_v0:
                tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
            elif opts.pad_cond_uncond:
                tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        x_out = self._run_model(x_in, sigma_in, image_cond_in, tensor, uncond, batch_size, skip_uncond, make_cond)

        denoised_image_indexes = [conds[0][0] for conds in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out] + [x_out[i:i + 1] for i in denoised_image_indexes])

        cfg_denoised_callback(CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))
        n_uncond = _crossattn(uncond).shape[0]
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-n_uncond:])

        scale = 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier
        denoised = self.combine_denoised(x_out, conds_list, _crossattn(uncond), scale)

        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._apply_blend(denoised, sigma)

        cond_rows = torch.cat([x_in[i:i + 1] for i in denoised_image_indexes])
        self.sampler.last_latent = self.get_pred_x0(cond_rows, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]), sigma)
        sd_samplers_common.store_latent(self.sampler.last_latent)

        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        denoised = after.x

        self.step += 1
        return denoised

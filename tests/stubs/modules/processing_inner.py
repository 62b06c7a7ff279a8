"""Part of the fake ``modules/processing.py`` (split for size): ``process_images_inner``.

Mirrors the v1.10.1 loop: seeds/prompts, ``scripts.process``, ``p.init``, then per batch
``before_process_batch`` -> extra networks (-> ``after_extra_networks_activate``) -> ``process_batch``
-> ``setup_conds`` -> ``p.sample`` (-> ``process_before_every_sampling`` [x2 with hires fix,
``before_hr`` between]) -> ``post_sample`` -> VAE decode -> ``postprocess_batch`` ->
``postprocess_batch_list`` -> per image ``postprocess_image`` / ``postprocess_maskoverlay`` /
``postprocess_image_after_composite``; finally ``postprocess``. An exception anywhere propagates
and ``postprocess`` is not called; an interrupt ends sampling early and the run finishes normally.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import devices, extra_networks, images, rng, scripts, shared
from modules.sd_hijack import model_hijack
from modules.shared import opts, state


def process_images_inner(p):
    from modules.processing import Processed, create_infotext, decode_latent_batch, get_fixed_seed, opt_C, opt_f

    assert len(p.prompt) > 0 if isinstance(p.prompt, list) else p.prompt is not None
    devices.torch_gc()
    seed, subseed = get_fixed_seed(p.seed), get_fixed_seed(p.subseed)
    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling
    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.sd_vae_name = None
    p.sd_vae_hash = None
    model_hijack.apply_circular(p.tiling)
    model_hijack.clear_comments()
    p.fill_fields_from_opts()
    p.setup_prompts()
    p.all_seeds = seed if isinstance(seed, list) else [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    p.all_subseeds = subseed if isinstance(subseed, list) else [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts, output_images = [], []
    with torch.no_grad(), p.sd_model.ema_scope():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            _run_batch(p, n, infotexts, output_images, Processed, create_infotext, decode_latent_batch, opt_C, opt_f)

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))
        p.color_corrections = None
        index_of_first_image = 0
        unwanted_grid = len(output_images) < 2 and opts.grid_only_if_multiple
        if (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid:
            grid = images.image_grid(output_images, p.batch_size)
            text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=True)
            if opts.return_grid:
                infotexts.insert(0, text)
                if opts.enable_pnginfo:
                    grid.info["parameters"] = text
                output_images.insert(0, grid)
                index_of_first_image = 1
            if opts.grid_save:
                images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                                  info=text, short_filename=not opts.grid_extended_filename, p=p, grid=True)

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    devices.torch_gc()

    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0], subseed=p.all_subseeds[0],
                    index_of_first_image=index_of_first_image, infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


def _run_batch(p, n, infotexts, output_images, Processed, create_infotext, decode_latent_batch, opt_C, opt_f) -> None:
    p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
    p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
    p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
    p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
    latent_channels = getattr(shared.sd_model, "latent_channels", opt_C)
    p.rng = rng.ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds,
                         subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                         seed_resize_from_w=p.seed_resize_from_w)
    if p.scripts is not None:
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
    if len(p.prompts) == 0:
        return
    p.parse_extra_network_prompts()
    if not p.disable_extra_networks:
        with devices.autocast():
            extra_networks.activate(p, p.extra_network_data)
    if p.scripts is not None:
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
    p.setup_conds()
    p.extra_generation_params.update(model_hijack.extra_generation_params)
    for comment in model_hijack.comments:
        p.comment(comment)
    if p.n_iter > 1:
        shared.state.job = f"Batch {n + 1} out of {p.n_iter}"

    with devices.without_autocast() if devices.unet_needs_upcast else devices.autocast():
        samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                           subseed_strength=p.subseed_strength, prompts=p.prompts)
    if p.scripts is not None:
        ps = scripts.PostSampleArgs(samples)
        p.scripts.post_sample(p, ps)
        samples = ps.samples
    if getattr(samples, "already_decoded", False):
        x_samples = samples
    else:
        devices.test_for_nans(samples, "unet")
        x_samples = decode_latent_batch(p.sd_model, samples, target_device=devices.cpu, check_for_nans=True)
    x_samples = torch.clamp((torch.stack(list(x_samples)).float() + 1.0) / 2.0, min=0.0, max=1.0)
    state.nextjob()

    if p.scripts is not None:
        p.scripts.postprocess_batch(p, x_samples, batch_number=n)
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        batch_params = scripts.PostprocessBatchListArgs(list(x_samples))
        p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
        x_samples = batch_params.images

    def infotext(index=0, use_main_prompt=False):
        return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt, index=index,
                               all_negative_prompts=p.negative_prompts)

    save_samples = p.save_samples()
    for i, x_sample in enumerate(x_samples):
        p.batch_index = i
        image = Image.fromarray((255.0 * np.moveaxis(x_sample.cpu().numpy(), 0, 2)).astype(np.uint8))
        image = _postprocess_one(p, i, image)
        if save_samples:
            images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], opts.samples_format, info=infotext(i), p=p)
        text = infotext(i)
        infotexts.append(text)
        if opts.enable_pnginfo:
            image.info["parameters"] = text
        output_images.append(image)
    devices.torch_gc()


def _postprocess_one(p, i: int, image: Image.Image) -> Image.Image:
    from modules.processing import apply_overlay
    if p.scripts is not None:
        pp = scripts.PostprocessImageArgs(image)
        p.scripts.postprocess_image(p, pp)
        image = pp.image
    mask_for_overlay = getattr(p, "mask_for_overlay", None)
    overlays = getattr(p, "overlay_images", None)
    overlay_image = overlays[i] if opts.overlay_inpaint and overlays is not None and i < len(overlays) else None
    if p.scripts is not None:
        ppmo = scripts.PostProcessMaskOverlayArgs(i, mask_for_overlay, overlay_image)
        p.scripts.postprocess_maskoverlay(p, ppmo)
        overlay_image = ppmo.overlay_image
    image, _ = apply_overlay(image, p.paste_to, overlay_image)
    if p.scripts is not None:
        pp = scripts.PostprocessImageArgs(image)
        p.scripts.postprocess_image_after_composite(p, pp)
        image = pp.image
    return image

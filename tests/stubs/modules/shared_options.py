"""Fake of ``modules/shared_options.py``: the builtin settings (keys and defaults from v1.10.1).

Only settings that the stub pipeline or an extension reads are declared, grouped in the real
sections; UI components are omitted (``component=None``) because no settings page is built.
"""
from __future__ import annotations

from modules.options import OptionInfo, categories, options_section

categories.register_category("saving", "Saving images")
categories.register_category("sd", "Stable Diffusion")
categories.register_category("ui", "User Interface")
categories.register_category("system", "System")
categories.register_category("postprocessing", "Postprocessing")
categories.register_category("training", "Training")

restricted_opts = {"samples_filename_pattern", "directories_filename_pattern", "outdir_samples",
                   "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_grids", "outdir_save"}

options_templates: dict[str, OptionInfo] = {}

options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "samples_format": OptionInfo("png", "File format for images"),
    "samples_filename_pattern": OptionInfo("", "Images filename pattern"),
    "save_images_add_number": OptionInfo(True, "Add number to filename when saving"),
    "grid_save": OptionInfo(True, "Always save all generated image grids"),
    "grid_format": OptionInfo("png", "File format for grids"),
    "grid_extended_filename": OptionInfo(False, "Add extended info (seed, prompt) to filename when saving grid"),
    "grid_only_if_multiple": OptionInfo(True, "Do not save grids consisting of one picture"),
    "return_grid": OptionInfo(True, "Show grid in gallery"),
    "enable_pnginfo": OptionInfo(True, "Write infotext to metadata of the generated image"),
    "save_images_before_face_restoration": OptionInfo(False, "Save a copy of image before doing face restoration."),
    "save_images_before_highres_fix": OptionInfo(False, "Save a copy of image before applying highres fix."),
    "save_images_before_color_correction": OptionInfo(False, "Save a copy of image before applying color correction to img2img results"),
    "save_mask": OptionInfo(False, "For inpainting, save a copy of the greyscale mask"),
    "save_mask_composite": OptionInfo(False, "For inpainting, save a masked composite"),
    "return_mask": OptionInfo(False, "For inpainting, include the greyscale mask in results for web"),
    "return_mask_composite": OptionInfo(False, "For inpainting, include masked composite in results for web"),
    "jpeg_quality": OptionInfo(80, "Quality for saved jpeg and avif images"),
    "save_init_img": OptionInfo(False, "Save init images when using img2img"),
    "save_to_dirs": OptionInfo(True, "Save images to a subdirectory"),
    "grid_save_to_dirs": OptionInfo(True, "Save grids to a subdirectory"),
    "directories_filename_pattern": OptionInfo("[date]", "Directory name pattern"),
}))

options_templates.update(options_section(("saving-paths", "Paths for saving", "saving"), {
    "outdir_samples": OptionInfo("", "Output directory for images; if empty, defaults to three directories below"),
    "outdir_txt2img_samples": OptionInfo("outputs/txt2img-images", "Output directory for txt2img images"),
    "outdir_img2img_samples": OptionInfo("outputs/img2img-images", "Output directory for img2img images"),
    "outdir_grids": OptionInfo("", "Output directory for grids; if empty, defaults to two directories below"),
    "outdir_txt2img_grids": OptionInfo("outputs/txt2img-grids", "Output directory for txt2img grids"),
    "outdir_img2img_grids": OptionInfo("outputs/img2img-grids", "Output directory for img2img grids"),
}))

options_templates.update(options_section(("face-restoration", "Face restoration", "postprocessing"), {
    "face_restoration": OptionInfo(False, "Restore faces", infotext="Face restoration"),
    "face_restoration_model": OptionInfo("CodeFormer", "Face restoration model"),
}))

options_templates.update(options_section(("upscaling", "Upscaling", "postprocessing"), {
    "upscaler_for_img2img": OptionInfo(None, "Upscaler for img2img"),
}))

options_templates.update(options_section(("system", "System", "system"), {
    "memmon_poll_rate": OptionInfo(8, "VRAM usage polls per second during generation."),
    "disable_mmap_load_safetensors": OptionInfo(False, "Disable memmapping for loading .safetensors files."),
    "profiling_enable": OptionInfo(False, "Enable profiling"),
}))

options_templates.update(options_section(("training", "Training", "training"), {
    "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training if possible. Saves VRAM."),
    "pin_memory": OptionInfo(False, "Turn on pin_memory for DataLoader. Makes training slightly faster but can increase memory usage."),
    "save_training_settings_to_txt": OptionInfo(True, "Save textual inversion and hypernet settings to a text file whenever training starts."),
}))

options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
    "sd_unet": OptionInfo("Automatic", "SD Unet"),
    "enable_quantization": OptionInfo(False, "Enable quantization in K samplers for sharper and cleaner results."),
    "emphasis": OptionInfo("Original", "Emphasis mode", infotext="Emphasis"),
    "enable_batch_seeds": OptionInfo(True, "Make K-diffusion samplers produce same images in a batch as when making a single image"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", infotext="Clip skip"),
    "upcast_attn": OptionInfo(False, "Upcast cross attention layer to float32"),
    "randn_source": OptionInfo("GPU", "Random number generator source.", infotext="RNG"),
    "tiling": OptionInfo(False, "Tiling", infotext="Tiling"),
    "hires_fix_refiner_pass": OptionInfo("second pass", "Hires fix: which pass to enable refiner for"),
}))

options_templates.update(options_section(("sdxl", "Stable Diffusion XL", "sd"), {
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
}))

options_templates.update(options_section(("vae", "VAE", "sd"), {
    "sd_vae": OptionInfo("Automatic", "SD VAE", infotext="VAE"),
    "auto_vae_precision_bfloat16": OptionInfo(False, "Automatically convert VAE to bfloat16"),
    "auto_vae_precision": OptionInfo(True, "Automatically revert VAE to 32-bit floats"),
    "sd_vae_encode_method": OptionInfo("Full", "VAE type for encode", infotext="VAE Encoder"),
    "sd_vae_decode_method": OptionInfo("Full", "VAE type for decode", infotext="VAE Decoder"),
}))

options_templates.update(options_section(("img2img", "img2img", "sd"), {
    "inpainting_mask_weight": OptionInfo(1.0, "Inpainting conditioning mask strength", infotext="Conditional mask weight"),
    "initial_noise_multiplier": OptionInfo(1.0, "Noise multiplier for img2img", infotext="Noise multiplier"),
    "img2img_extra_noise": OptionInfo(0.0, "Extra noise multiplier for img2img and hires fix", infotext="Extra noise"),
    "img2img_color_correction": OptionInfo(False, "Apply color correction to img2img results to match original colors."),
    "img2img_fix_steps": OptionInfo(False, "With img2img, do exactly the amount of steps the slider specifies."),
    "img2img_background_color": OptionInfo("#ffffff", "With img2img, fill transparent parts of the input image with this color."),
    "overlay_inpaint": OptionInfo(True, "Overlay original for inpaint"),
}))

options_templates.update(options_section(("optimizations", "Optimizations", "sd"), {
    "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization"),
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma", infotext="NGMS"),
    "s_min_uncond_all": OptionInfo(False, "Negative Guidance minimum sigma all steps", infotext="NGMS all steps"),
    "token_merging_ratio": OptionInfo(0.0, "Token merging ratio", infotext="Token merging ratio"),
    "token_merging_ratio_img2img": OptionInfo(0.0, "Token merging ratio for img2img"),
    "token_merging_ratio_hr": OptionInfo(0.0, "Token merging ratio for high-res pass", infotext="Token merging ratio hr"),
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt", infotext="Pad conds"),
    "pad_cond_uncond_v0": OptionInfo(False, "Pad prompt/negative prompt (v0)", infotext="Pad conds v0"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
    "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling", infotext="Skip Early CFG"),
}))

options_templates.update(options_section(("compatibility", "Compatibility", "sd"), {
    "use_old_hires_fix_width_height": OptionInfo(False, "For hires fix, use width/height sliders to set final resolution rather than first pass."),
    "hires_fix_use_firstpass_conds": OptionInfo(False, "For hires fix, calculate conds of second pass using extra networks of first pass."),
    "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines."),
    "refiner_switch_by_sample_steps": OptionInfo(False, "Switch to refiner by sampling steps instead of model timesteps."),
}))

options_templates.update(options_section(("infotext", "Infotext", "ui"), {
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
    "add_model_name_to_info": OptionInfo(True, "Add model name to infotext"),
    "add_user_name_to_info": OptionInfo(False, "Add user name to infotext when authenticated"),
    "add_version_to_infotext": OptionInfo(True, "Add program version to infotext"),
    "add_vae_name_to_info": OptionInfo(True, "Add VAE name to infotext"),
    "add_vae_hash_to_info": OptionInfo(True, "Add VAE hash to infotext"),
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
    "infotext_styles": OptionInfo("Apply if any", "Infer styles from prompts of pasted infotext"),
}))

options_templates.update(options_section(("ui", "Live previews", "ui"), {
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "show_progress_grid": OptionInfo(True, "Show previews of all images generated in a batch as a grid"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
    "show_progress_type": OptionInfo("Approx NN", "Live preview method"),
    "live_preview_content": OptionInfo("Prompt", "Live preview subject"),
    "live_preview_fast_interrupt": OptionInfo(False, "Return image with chosen live preview method on interrupt"),
    "quicksettings_list": OptionInfo(["sd_model_checkpoint"], "Quicksettings list"),
    "hidden_tabs": OptionInfo([], "Hidden UI tabs"),
}))

options_templates.update(options_section(("sampler-params", "Sampler parameters", "sd"), {
    "eta_ddim": OptionInfo(0.0, "Eta for DDIM", infotext="Eta DDIM"),
    "eta_ancestral": OptionInfo(1.0, "Eta for k-diffusion samplers", infotext="Eta"),
    "s_churn": OptionInfo(0.0, "sigma churn", infotext="Sigma churn"),
    "s_tmin": OptionInfo(0.0, "sigma tmin", infotext="Sigma tmin"),
    "s_tmax": OptionInfo(0.0, "sigma tmax", infotext="Sigma tmax"),
    "s_noise": OptionInfo(1.0, "sigma noise", infotext="Sigma noise"),
    "sigma_min": OptionInfo(0.0, "sigma min", infotext="Schedule min sigma"),
    "sigma_max": OptionInfo(0.0, "sigma max", infotext="Schedule max sigma"),
    "rho": OptionInfo(0.0, "rho", infotext="Schedule rho"),
    "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta", infotext="ENSD"),
    "always_discard_next_to_last_sigma": OptionInfo(False, "Always discard next-to-last sigma", infotext="Discard penultimate sigma"),
    "sgm_noise_multiplier": OptionInfo(False, "SGM noise multiplier", infotext="SGM noise multplier"),
    "no_dpmpp_sde_batch_determinism": OptionInfo(False, "Do not make DPM++ SDE deterministic across different batch sizes."),
}))

options_templates.update(options_section((None, "Hidden options"), {
    "disabled_extensions": OptionInfo([], "Disable these extensions"),
    "disable_all_extensions": OptionInfo("none", "Disable all extensions (preserves the list of disabled extensions)"),
    "sd_checkpoint_hash": OptionInfo("", "SHA256 hash of the current checkpoint"),
}))

"""Single-file SD1.x / SD2.x / SDXL checkpoints (the WebUI's ``models/Stable-diffusion`` files) as diffusers
components, offline.

diffusers' ``from_single_file`` fetches component configs and tokenizers from the Hub; here nothing is
fetched. The family is read from the keys; the original (ldm/sgm) config is the ``<name>.yaml`` beside the
file when there is one (the WebUI's own convention), else the released config of the family, built in code.
diffusers' key converters (``diffusers.loaders.single_file_utils``, diffusers >= 0.28) turn the UNet and
VAE weights into diffusers layouts; text encoder configs are read from the weights' shapes (CLIP heads
are 64 wide). The CLIP tokenizer comes from ``--tokenizer DIR`` or from the local Hugging Face cache
(``openai/clip-vit-large-patch14``, which the WebUI downloads on its first start); it is looked up before the
checkpoint is read, so a missing one is said at once rather than after loading gigabytes.
"""
from __future__ import annotations

import copy
import hashlib
import re
import warnings
from pathlib import Path

import torch

from ..errors import FormatError, InputError, MissingFileError
from ..tiny import scaled_linear_alphas_cumprod
from .backends.base import prediction_type

_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                     num_res_blocks=2, attn_resolutions=[], dropout=0.0)
_UNET_COMMON = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, use_spatial_transformer=True,
                    legacy=False)
# (original config, text encoders as (state-dict prefix, layout), default prediction) per family.
_FAMILIES = {
    "sd1": ({"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
             "unet_config": {"params": dict(_UNET_COMMON, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                                            num_heads=8, transformer_depth=1, context_dim=768)}},
            [("cond_stage_model.transformer.", "hf")], "eps"),
    # SD2.x: most checkpoints are the 768-v models; 512-base users pass --prediction-type eps.
    "sd2": ({"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
             "unet_config": {"params": dict(_UNET_COMMON, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                                            num_head_channels=64, use_linear_in_transformer=True, transformer_depth=1,
                                            context_dim=1024)}},
            [("cond_stage_model.model.", "open_clip_penultimate")], "v"),
    "sdxl": ({"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.13025,
              "network_config": {"params": dict(_UNET_COMMON, adm_in_channels=2816, num_classes="sequential",
                                                attention_resolutions=[4, 2], channel_mult=[1, 2, 4],
                                                num_head_channels=64, use_linear_in_transformer=True,
                                                transformer_depth=[1, 2, 10], context_dim=2048)}},
             [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")], "eps"),
}
_TOKENIZER_REPO = "openai/clip-vit-large-patch14"


def detect_family(state: dict) -> str:
    if any(k.startswith("conditioner.embedders.1.model.") for k in state):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in state):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return "sd1"
    raise FormatError("this file is not an SD1.x, SD2.x or SDXL checkpoint (no known text encoder keys); "
                      "pass a full Stable Diffusion checkpoint or a diffusers-format folder")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a format problem for the user
        raise FormatError(f"cannot read {path.name}: {exc}; is the file complete (re-download it)?") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def checkpoint_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, the old 8-digit hash: sha256 of 64 KiB at 1 MiB) as the WebUI and kohya compute
    them (``ss_new_sd_model_hash``, ``ss_sd_model_hash``)."""
    full, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            full.update(block)
        f.seek(0x100000)
        legacy.update(f.read(0x10000))
    return full.hexdigest(), legacy.hexdigest()[:8]


def original_config(path: Path, family: str) -> dict:
    """``{"model": {"params": ...}}``: the yaml beside the checkpoint (as the WebUI reads it) or the family's own."""
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        import yaml

        config = yaml.safe_load(beside.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "params" not in config.get("model", {}):
            raise FormatError(f"{beside} is not an ldm/sgm model config (no model.params); remove it or fix it")
        return config
    params = copy.deepcopy(_FAMILIES[family][0])
    params["first_stage_config"] = {"params": {"ddconfig": dict(_VAE_DDCONFIG)}}
    return {"model": {"params": params}}


def _converters():
    try:
        from diffusers.loaders import single_file_utils as utils

        utils.create_unet_diffusers_config_from_ldm, utils.convert_open_clip_checkpoint  # noqa: B018
    except (ImportError, AttributeError):
        import diffusers

        raise InputError(f"single-file checkpoints need diffusers 0.28 or newer (installed: {diffusers.__version__}); "
                         "upgrade diffusers or convert the checkpoint to a diffusers-format folder") from None
    return utils


def _load_strict(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    missing, _ = module.load_state_dict(state, strict=False)  # extras (EMA copies, logit_scale ...) are not used
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise FormatError(f"{path.name}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[0]}); "
                          "the file is damaged or not a full SD checkpoint")


def _text_encoder(state: dict, prefix: str, layout: str, path: Path, utils):
    """A transformers CLIP text encoder whose config is read from the weights' shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf = layout == "hf"
    emb = state[prefix + ("text_model.embeddings.token_embedding.weight" if hf else "token_embedding.weight")]
    pos = state[prefix + ("text_model.embeddings.position_embedding.weight" if hf else "positional_embedding")]
    pattern = re.compile(re.escape(prefix) + (r"text_model\.encoder\.layers\.(\d+)\." if hf else r"transformer\.resblocks\.(\d+)\."))
    layers = 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))
    fc = state[prefix + ("text_model.encoder.layers.0.mlp.fc1.weight" if hf else "transformer.resblocks.0.mlp.c_fc.weight")]
    hidden = emb.shape[1]
    projection = state.get(prefix + "text_projection")
    config = CLIPTextConfig(vocab_size=emb.shape[0], hidden_size=hidden, intermediate_size=fc.shape[0],
                            max_position_embeddings=pos.shape[0],
                            num_hidden_layers=layers - 1 if layout == "open_clip_penultimate" else layers,
                            num_attention_heads=max(1, hidden // 64) if hidden >= 64 else max(1, hidden // 8),
                            hidden_act="quick_gelu" if hf else "gelu",
                            projection_dim=projection.shape[1] if projection is not None else hidden)
    with_projection = layout == "open_clip"
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    if hf:
        converted = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        converted = utils.convert_open_clip_checkpoint(model, state, prefix=prefix)
    _load_strict(model, converted, "text encoder", path)
    return model.eval()


def _tokenizer(tokenizer_dir: Path | None, pad_token: str | None):
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token else {}
    kw["model_max_length"] = 77  # every SD text encoder reads 77 tokens; bare vocab folders do not say so
    where = str(tokenizer_dir) if tokenizer_dir is not None else _TOKENIZER_REPO
    try:
        return CLIPTokenizer.from_pretrained(where, local_files_only=True, **kw)
    except (OSError, ValueError):
        raise MissingFileError(
            "single-file checkpoints need the CLIP tokenizer files (vocab.json and merges.txt): pass --tokenizer DIR "
            "with a folder holding them (e.g. the tokenizer/ folder of any SD1.5 diffusers model), or start the WebUI "
            f"once so that the Hugging Face cache holds {_TOKENIZER_REPO}"
            + (f"; {tokenizer_dir} does not have them" if tokenizer_dir is not None else "")) from None


def load_single_file(path: Path, dtype: torch.dtype = torch.float32, tokenizer_dir: Path | None = None,
                     prediction: str | None = None):
    """A ``DiffusersBackend`` over a single-file checkpoint; see the module docstring."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .backends.diffusers import DiffusersBackend

    utils = _converters()
    tokenizer = _tokenizer(tokenizer_dir, None)  # before reading gigabytes: a missing tokenizer is said at once
    state = read_checkpoint(path)
    family = detect_family(state)
    original = original_config(path, family)
    with warnings.catch_warnings():  # image_size (not used for training) is deprecated in diffusers >= 0.28
        warnings.simplefilter("ignore", FutureWarning)
        unet_config = utils.create_unet_diffusers_config_from_ldm(original, state, image_size=512)
        vae_config = utils.create_vae_diffusers_config_from_ldm(original, state, image_size=512)
    unet = UNet2DConditionModel(**unet_config)
    _load_strict(unet, utils.convert_ldm_unet_checkpoint(state, unet_config), "UNet", path)
    vae = AutoencoderKL(**vae_config)
    _load_strict(vae, utils.convert_ldm_vae_checkpoint(state, vae_config), "VAE", path)
    encoders = [_text_encoder(state, prefix, layout, path, utils) for prefix, layout in _FAMILIES[family][1]]
    # diffusers' SD2 tokenizer and SDXL's second one pad with "!" (OpenCLIP's zero padding), CLIP-L's with <|endoftext|>
    tokenizers = [tokenizer if layout == "hf" else _tokenizer(tokenizer_dir, "!")
                  for _, layout in _FAMILIES[family][1]]
    params = original["model"]["params"]
    alphas = scaled_linear_alphas_cumprod(int(params.get("timesteps", 1000)), float(params.get("linear_start", 0.00085)),
                                          float(params.get("linear_end", 0.012)))
    default = params.get("parameterization", _FAMILIES[family][2])
    del state
    sha256, legacy = checkpoint_hashes(path)
    return DiffusersBackend(unet.to(dtype).eval(), vae.to(dtype).eval(), [e.to(dtype) for e in encoders], tokenizers,
                            alphas, prediction_type(prediction, default), name=path.name, sha256=sha256,
                            legacy_hash=legacy)

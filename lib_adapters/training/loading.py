"""Building the headless training backend from what the user points at: a diffusers-format folder, a single-file
SD1.x/SD2.x/SDXL checkpoint (``single_file.py``), or nothing (the built-in tiny model).

Everything loads offline (``local_files_only=True``); a missing part raises ``MissingFileError`` naming
what to put where. Base weights are loaded in the dtype of the run's mixed precision (fp32 otherwise):
only the trainable weights need fp32, and the loop keeps those in fp32 itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, MissingFileError
from ..tiny import scaled_linear_alphas_cumprod
from .backends.base import PREDICTION_NAMES, TrainingBackend, prediction_type
from .config import Precision

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """What to train on. ``checkpoint`` None: the built-in tiny model (``tiny_seed`` draws its weights)."""

    checkpoint: Path | None = None
    tokenizer_dir: Path | None = None  # single files: a folder with the CLIP tokenizer's vocab.json + merges.txt
    prediction_type: str | None = None  # "eps"/"v" (or diffusers' "epsilon"/"v_prediction"); None: from the model
    tiny_seed: int = 0

    def __post_init__(self):
        for name in ("checkpoint", "tokenizer_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser())
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_NAMES:
            raise InputError(f"prediction type must be eps or v (epsilon / v_prediction); got {self.prediction_type!r}")


def base_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """fp16/bf16 base weights under the matching autocast on a GPU; fp32 on the CPU and for fp32 runs."""
    return precision.resolve(device).dtype if device.type == "cuda" else torch.float32


def require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise MissingFileError("the command-line trainer loads models with diffusers, which is not installed: "
                               "pip install 'diffusers>=0.27'") from None


def load_backend(source: ModelSource, device: torch.device, dtype: torch.dtype = torch.float32) -> TrainingBackend:
    """The ``DiffusersBackend`` for ``source`` on ``device``, base weights in ``dtype``."""
    require_diffusers()
    path = source.checkpoint
    if path is None:
        backend = load_tiny(source.tiny_seed)  # eps-prediction, like SD1.x
    elif not path.exists():
        raise MissingFileError(f"the checkpoint {path} does not exist; pass a diffusers-format folder (with "
                               f"model_index.json) or a .safetensors/.ckpt file")
    elif path.is_dir():
        backend = load_diffusers_folder(path, dtype, source.prediction_type)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from .single_file import load_single_file

        backend = load_single_file(path, dtype, source.tokenizer_dir, source.prediction_type)
    else:
        raise InputError(f"{path.name} is neither a diffusers-format folder nor a .safetensors/.ckpt checkpoint")
    _to(backend, device, dtype)
    return backend


def _to(backend, device: torch.device, dtype: torch.dtype) -> None:
    for module in backend.base_modules():
        module.to(device=device, dtype=dtype)


def _component(load, folder: Path, name: str, what: str):
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise MissingFileError(f"could not load the {what} from {folder / name} ({exc}); a diffusers-format model "
                               f"folder needs {name}/ with its config and weights (nothing is downloaded)") from None


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32, prediction: str | None = None):
    """A ``DiffusersBackend`` over a diffusers-format folder (SD1.x/SD2.x: one text encoder; SDXL: two)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .backends.diffusers import DiffusersBackend

    if not (folder / "unet").is_dir():
        raise MissingFileError(f"{folder} is not a diffusers-format model folder (no unet/ inside); pass the folder "
                               "that holds model_index.json, or a single .safetensors/.ckpt checkpoint file")
    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = _component(lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw), folder, "unet", "UNet")
    vae = _component(lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw), folder, "vae", "VAE")
    encoders, tokenizers = [], []
    for suffix, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        if suffix and not (folder / f"text_encoder{suffix}").is_dir():
            break
        encoders.append(_component(lambda: cls.from_pretrained(folder, subfolder=f"text_encoder{suffix}", **kw),
                                   folder, f"text_encoder{suffix}", "text encoder"))
        tokenizers.append(_component(lambda: CLIPTokenizer.from_pretrained(folder, subfolder=f"tokenizer{suffix}",
                                                                           local_files_only=True),
                                     folder, f"tokenizer{suffix}", "tokenizer"))
    scheduler = _component(lambda: DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
                           folder, "scheduler", "noise schedule")
    parameterization = prediction_type(prediction, scheduler.config.get("prediction_type", "epsilon"))
    return DiffusersBackend(unet.eval(), vae.eval(), [e.eval() for e in encoders], tokenizers,
                            scheduler.alphas_cumprod, parameterization, name=folder.name)


def load_tiny(seed: int = 0):
    """A ``DiffusersBackend`` over the built-in tiny model (``tiny_diffusers``), freshly built from ``seed`` (CPU,
    fp32). Weights are drawn inside ``torch.random.fork_rng``: building never disturbs the caller's RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..tiny_diffusers import WordHashTokenizer, tiny_clip_text_model, tiny_unet_config, tiny_vae_config
    from .backends.diffusers import DiffusersBackend

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config()).eval()
        vae = AutoencoderKL(**tiny_vae_config()).eval()
        text_encoder = tiny_clip_text_model(32)
    return DiffusersBackend(unet, vae, [text_encoder], [WordHashTokenizer()], scaled_linear_alphas_cumprod(),
                            "eps", name=f"tiny-sd1-seed{seed}")

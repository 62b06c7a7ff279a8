"""Writing and reading kohya-format LoRA files (``.safetensors`` with ``ss_*`` and ``modelspec.*`` metadata).

The metadata is what the WebUI's Lora extension reads: ``ss_output_name`` (the alias),
``ss_base_model_version`` / ``ss_v2`` (version detection, "hide incompatible"), ``sshs_model_hash``
(the short hash in infotext), ``ss_tag_frequency`` (training tags in the metadata editor). Hashes
follow kohya's ``precalculate_safetensors_hashes``: sha256 of the tensor payload of the file as
serialised with only the ``ss_*`` metadata (so later user edits do not change it), and the legacy
8-digit hash of 64 KiB at 1 MiB.

The ``ss_*`` keys and their spellings are those of kohya's ``train_network.py`` (values ``str()`` of
Python values: "True", "None", "(512, 512)"; JSON where kohya dumps JSON), so LoRA viewers show the same
for our files as for kohya's: images counted with their repeats, ``ss_dataset_dirs``, the epochs and
batches per epoch, ``ss_bucket_info`` as ``BaseDataset.make_buckets`` fills it, the optimizer by its
qualified class name, the checkpoint's hashes when the backend knows them. What we do not do (caption
shuffling, kept tokens, flipping) is written as kohya writes its defaults.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from ...arch import BaseArch
from ...errors import FormatError, MissingFileError
from ..backends.base import Parameterization
from ..config import LoraConfig
from ..outputs import atomic_write
from .base import ExportInfo

def _payload_sha256(data: bytes) -> str:
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def _legacy_hash(data: bytes) -> str:
    return hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them."""
    data = save_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return _payload_sha256(data), _legacy_hash(data)


def kohya_metadata(info: ExportInfo, lora: LoraConfig, trains_text_encoder: bool) -> dict[str, str]:
    c = info.config
    model = info.model
    metadata = {
        "ss_session_id": info.session_id or uuid.uuid4().hex,
        "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": c.output_name,
        "ss_sd_model_name": model.name,
        **({"ss_sd_model_hash": model.legacy_hash} if model.legacy_hash else {}),
        **({"ss_new_sd_model_hash": model.sha256} if model.sha256 else {}),
        "ss_base_model_version": model.base_model_version,
        "ss_v2": str(model.arch is BaseArch.SD2),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_network_args": json.dumps({"targets": lora.targets.value, **({"conv_dim": str(lora.rank),
                                       "conv_alpha": str(float(lora.alpha))} if lora.targets.conv else {})}),
        "ss_network_train_unet_only": str(not trains_text_encoder),
        "ss_learning_rate": str(c.learning_rate),
        "ss_unet_lr": str(c.learning_rate),
        "ss_text_encoder_lr": str(lora.text_encoder_lr or c.learning_rate) if trains_text_encoder else "0",
        "ss_optimizer": optimizer_name(c),
        "ss_lr_scheduler": c.lr_schedule.value,
        "ss_lr_warmup_steps": str(c.warmup_steps),
        "ss_max_grad_norm": str(c.max_grad_norm or 0.0),
        "ss_mixed_precision": {"fp32": "no"}.get(c.precision.value, c.precision.value),
        "ss_gradient_checkpointing": str(c.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(c.grad_accumulation),
        "ss_seed": str(c.seed),
        "ss_steps": str(info.step),
        "ss_max_train_steps": str(c.steps),
        "ss_batch_size_per_device": str(c.batch_size),
        **dataset_metadata(info),
        "ss_clip_skip": str(model.clip_skip),  # "None" when no layer is skipped, as kohya's default
        "ss_shuffle_caption": "False",
        "ss_keep_tokens": "0",
        "ss_flip_aug": "False",
        "ss_resolution": f"({c.resolution}, {c.resolution})",
        "ss_enable_bucket": str(c.buckets),
        "ss_cache_latents": str(c.cache_latents),
        "ss_noise_offset": str(c.noise_offset) if c.noise_offset else "None",
        "ss_min_snr_gamma": str(c.min_snr_gamma) if c.min_snr_gamma else "None",
        "ss_tag_frequency": json.dumps(info.tag_frequency, ensure_ascii=False),
        **info.modelspec("lora"),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if model.arch is BaseArch.SDXL
                                     else "diffusers"),
        "modelspec.prediction_type": "v" if model.parameterization is Parameterization.V else "epsilon",
    }
    return metadata


def optimizer_name(config) -> str:
    """kohya's ``ss_optimizer``: the optimizer class's module and name, with the arguments given beyond its defaults
    (``optimizer_args``) in parentheses; our only such argument is a weight decay other than AdamW's 0.01."""
    name = _OPTIMIZER_CLASSES[config.optimizer.value]
    return name + (f"(weight_decay={config.weight_decay})" if config.weight_decay != 0.01 else "")


_OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"}


def dataset_metadata(info: ExportInfo) -> dict[str, str]:
    """kohya's dataset keys. ``ss_num_train_images`` counts every image as often as it repeats (images x repeats);
    ``ss_dataset_dirs`` gives each folder's repeats and image count; an epoch is one pass over the images with their
    repeats, in batches of one bucket (``ss_num_batches_per_epoch``), and ``ss_num_epochs`` is how many epochs the
    run's optimizer steps take (each step uses ``grad_accumulation`` batches)."""
    c, records, plan = info.config, info.records, info.plan
    if plan is None:  # an export without the run's dataset (tests, tools): what is known
        return {"ss_num_train_images": str(info.num_images)}
    dirs: dict[str, dict[str, int]] = {}
    for record in records:
        entry = dirs.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    batches = sum(math.ceil(n / plan.batch_size) for n in plan.bucket_counts.values())
    steps_per_epoch = math.ceil(batches / c.grad_accumulation)
    return {"ss_num_train_images": str(sum(r.repeats for r in records)),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_num_batches_per_epoch": str(batches),
            "ss_num_epochs": str(math.ceil(c.steps / steps_per_epoch)),
            "ss_bucket_info": json.dumps(bucket_info(records, plan) if c.buckets else None)}


def bucket_info(records, plan) -> dict:
    """As kohya's ``make_buckets`` fills ``bucket_info``: the buckets in use sorted by (width, height), numbered from 0,
    each with its resolution [w, h] and image count (repeats included), and the mean |bucket w/h - image w/h| over the
    images (without repeats)."""
    buckets = {i: {"resolution": [b.width, b.height], "count": n}
               for i, (b, n) in enumerate(plan.bucket_counts.items())}
    errors = [abs(p.bucket.width / p.bucket.height - r.width / r.height) for r, p in zip(records, plan.placements)]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya LoRA file atomically, adding ``sshs_model_hash`` and ``sshs_legacy_hash``."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"the LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:
        raise FormatError(f"{path} is not a readable .safetensors file ({exc})") from exc

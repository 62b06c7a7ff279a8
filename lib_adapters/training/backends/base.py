"""The interface the training loop needs from a model, whatever holds it (the WebUI's ldm/sgm model, diffusers).

A backend encodes images to latents and prompts to conditioning, runs the UNet on noisy latents,
and exposes the schedule (``alphas_cumprod``), the prediction type, the UNet module and the text
encoders (for LoRA). It also owns "training mode" for the base model: freezing every base weight
and, on request, gradient checkpointing; ``restore()`` puts the model back exactly as it was.

How the methods' contributions reach the UNet calls ``apply`` makes is the backend's call too, since hosts
differ there: ``t2i_features`` (a T2I-Adapter's features) and ``bind`` (an IP-Adapter's session points) default
to forward wrappers on the UNet's modules (``backends/injection.py``, ``unet/a1111.py``); the Forge backend
registers Forge patches instead.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Union

import torch
from torch import nn

from ...arch import BaseArch
from ...unet.a1111 import A1111Binding
from ...unet.points import UNetPoints
from ..latent_cache import CacheIdentity
from .grad_checkpointing import enable_block_checkpointing
from .injection import inject_features

Conditioning = Union[torch.Tensor, dict]  # SD1/SD2: [B, T, C]; SDXL: {"crossattn": [B, T, C], "vector": [B, D]}


class Parameterization(str, Enum):
    EPS = "eps"
    V = "v"


# Our names and diffusers' (a scheduler config's ``prediction_type``) for the two parameterizations.
PREDICTION_NAMES = {"epsilon": "eps", "eps": "eps", "v_prediction": "v", "v": "v"}


def prediction_type(value: str | None, default: str) -> str:
    """"eps" or "v": ``value`` when given (ours or diffusers' name), else the model's own ``default``."""
    return PREDICTION_NAMES[value] if value is not None else PREDICTION_NAMES.get(default, "eps")


class TextEncoderNaming(str, Enum):
    HF_CLIP = "hf_clip"  # transformers CLIPTextModel: text_model.encoder.layers.N.self_attn.q_proj ...
    OPEN_CLIP = "open_clip"  # open_clip: transformer.resblocks.N.attn (fused MultiheadAttention)


@dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder: its kohya prefix ("lora_te", "lora_te1", "lora_te2"), module and naming scheme."""

    prefix: str
    module: nn.Module
    naming: TextEncoderNaming


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's size conditioning of one sample: (height, width) pairs and the crop's (top, left)."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


@dataclass(frozen=True)
class ModelInfo:
    """What the exported file's metadata says about the base model."""

    arch: BaseArch
    parameterization: Parameterization
    name: str  # checkpoint file name or model id
    sha256: str | None  # checkpoint hash when known
    legacy_hash: str | None = None  # the WebUI's old 8-digit hash (sha256 of 64 KiB at 1 MiB) when known
    clip_skip: int | None = None  # CLIP layers skipped at the end when encoding prompts (None: none, i.e. 1)

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version``."""
        if self.arch is BaseArch.SDXL:
            return "sdxl_base_v1-0"
        version = "sd_v2" if self.arch is BaseArch.SD2 else "sd_v1"
        return version + ("_v" if self.parameterization is Parameterization.V else "")


class TrainingBackend(ABC):
    """See the module docstring. Implementations: ``LdmBackend`` (ldm/sgm), ``DiffusersBackend``."""

    arch: BaseArch
    # Set by every implementation's __init__:
    _unet: nn.Module
    _alphas: torch.Tensor
    _parameterization: Parameterization

    @property
    def unet(self) -> nn.Module:
        return self._unet

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's own training schedule, fp32, on the CPU."""
        return self._alphas

    @property
    def parameterization(self) -> Parameterization:
        return self._parameterization

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, 4, H/8, W/8]`` fp32 (deterministic: the posterior mean)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B, 3, H, W]`` in about [-1, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], sizes: list[SizeCondition] | None = None, *,
                       grad: bool = False) -> Conditioning:
        """Text conditioning; ``grad=True`` lets gradients reach the text encoders (text-encoder LoRA)."""

    @abstractmethod
    def apply(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (eps or v, see ``parameterization``) for noisy latents at ``timesteps``."""

    @abstractmethod
    def text_encoders(self) -> list[TextEncoderPart]: ...

    @abstractmethod
    def kohya_unet_name(self, path: str) -> str:
        """The kohya LoRA module name (``lora_unet_...``) of the UNet layer at ``path`` (a path inside ``unet``)."""

    @abstractmethod
    def identity(self) -> CacheIdentity:
        """Model and VAE identity for the latent cache."""

    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abstractmethod
    def base_modules(self) -> list[nn.Module]:
        """Every module holding base weights (UNet, VAE, text encoders): frozen during training."""

    @abstractmethod
    def checkpoint_blocks(self) -> list[nn.Module]:
        """The UNet blocks whose forward is recomputed in backward when gradient checkpointing is on."""

    # -- how contributions reach the UNet ----------------------------------------------------------
    @contextlib.contextmanager
    def t2i_features(self, features: list[torch.Tensor]) -> Iterator[None]:
        """``features[level]`` added at the T2I sites in the ``apply`` calls made inside the block."""
        with inject_features(self.unet, features):
            yield

    def bind(self, points: UNetPoints):
        """A binding (``install()``/``restore()``) that makes ``points`` act in the ``apply`` calls."""
        return A1111Binding(points)

    # -- training mode -----------------------------------------------------------------------------
    def prepare(self, gradient_checkpointing: bool = False) -> None:
        """Freeze every base weight explicitly (remembering the flags) and optionally checkpoint the UNet."""
        if getattr(self, "_saved_flags", None) is not None:
            return
        self._saved_flags = [(p, p.requires_grad) for m in self.base_modules() for p in m.parameters()]
        for module in self.base_modules():
            module.requires_grad_(False)
        self._patches = (enable_block_checkpointing(self.checkpoint_blocks(), self.checkpoint_context())
                         if gradient_checkpointing else None)

    def checkpoint_context(self):
        """``torch.utils.checkpoint``'s ``context_fn`` for the checkpointed blocks (None: none needed)."""
        return None

    def restore(self) -> None:
        """Undo ``prepare``: requires_grad flags as they were, block forwards as they were."""
        if getattr(self, "_patches", None) is not None:
            self._patches.restore()
            self._patches = None
        for param, flag in getattr(self, "_saved_flags", None) or []:
            param.requires_grad_(flag)
        self._saved_flags = None

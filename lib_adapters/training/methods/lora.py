"""LoRA on a loaded model: low-rank updates added to chosen Linear/Conv2d layers through forward hooks.

``y = base(x) + up(down(x)) * alpha / rank`` with ``up`` zero-initialised (so the model is unchanged
until the first step) and ``down`` kaiming-uniform, as in kohya's ``LoRAModule``. Hooks leave the
base modules, their names and state dicts untouched; ``close()`` removes every hook. The LoRA
weights are fp32 whatever the base dtype; under autocast the matmuls run in the autocast dtype.
A "Linear" is ``nn.Linear`` or a layer that computes as one without subclassing it: Forge main builds
its UNet and text encoders from its own ``Linear`` (an ``nn.Module`` with ``in_features``,
``out_features`` and a 2-D ``weight``, cast per call).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from ...errors import FormatError, InputError
from ...unet.points import linear_weight
from ..backends.base import TextEncoderNaming, TextEncoderPart, TrainingBackend
from ..config import LoraConfig, LoraTargets
from .base import ExportInfo, MethodBase
from .lora_file import kohya_metadata, load_lora, save_lora
from ..lora_names import kohya_name

log = logging.getLogger(__name__)

_TRANSFORMERS = ("SpatialTransformer", "Transformer2DModel")
_CONV_BLOCKS = ("ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D")
_ATTENTION = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TE_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
_TE_MLP = ("fc1", "fc2")


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or a host's own Linear layer that does not subclass it (``unet.points.linear_weight``)."""
    return linear_weight(module) is not None


class LoraModule(nn.Module):
    """The low-rank pair for one base layer; ``forward(x)`` is the delta to add to the base output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        device = base.weight.device
        if is_linear(base):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False, device=device)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        else:
            raise InputError(f"LoRA supports Linear and ungrouped Conv2d layers, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale


def _child_layers(module: nn.Module):
    for name, child in module.named_modules():
        if is_linear(child) or isinstance(child, nn.Conv2d):
            yield name, child


def unet_targets(unet: nn.Module, targets: LoraTargets) -> list[tuple[str, nn.Module]]:
    """(path inside the UNet, layer) for every layer that gets LoRA, in module order."""
    out: dict[str, nn.Module] = {}
    for path, module in unet.named_modules():
        kind = type(module).__name__
        if kind in _TRANSFORMERS:
            for name, child in _child_layers(module):
                if targets.feed_forward or _ATTENTION.search(name):
                    out[f"{path}.{name}"] = child
        elif kind in _CONV_BLOCKS and targets.conv:
            for name, child in _child_layers(module):
                out[f"{path}.{name}"] = child
    return list(out.items())


def text_encoder_targets(part: TextEncoderPart, targets: LoraTargets) -> list[tuple[str, nn.Module]]:
    """(kohya name, layer) for the CLIP attention projections (and MLP with feed-forward targets)."""
    wanted = _TE_ATTENTION + (_TE_MLP if targets.feed_forward else ())
    out = []
    for path, module in part.module.named_modules():
        if is_linear(module) and ".layers." in path and path.rsplit(".", 1)[-1] in wanted:
            out.append((kohya_name(part.prefix, path), module))
    return out


class LoraNetwork(nn.Module):
    """The LoRA modules of one run, keyed by kohya name, hooked into their base layers."""

    def __init__(self):
        super().__init__()
        self.loras = nn.ModuleDict()
        self.text_encoder_names: set[str] = set()
        self._bases: dict[str, nn.Module] = {}
        self._handles: list = []

    def add(self, name: str, base: nn.Module, rank: int, alpha: float, *, text_encoder: bool = False) -> None:
        if name in self.loras:
            raise InputError(f"two layers map to the same LoRA name {name!r}")
        self.loras[name] = LoraModule(base, rank, alpha)
        self._bases[name] = base
        if text_encoder:
            self.text_encoder_names.add(name)

    def attach(self) -> None:
        if self._handles:
            return
        for name, lora in self.loras.items():
            self._handles.append(self._bases[name].register_forward_hook(adding_hook(lora)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, lora in self.loras.items():
            for key, tensor in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight),
                                ("alpha", lora.alpha)):
                value = tensor.detach().to("cpu", copy=True)
                out[f"{name}.{key}"] = value.to(dtype) if dtype is not None else value.float()
        return out

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every module gets all three tensors with the right shapes, and no key is left over."""
        expected = self.kohya_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            raise FormatError(f"the LoRA weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), wrong shapes: {wrong[:3]}")
        with torch.no_grad():
            for name, lora in self.loras.items():
                lora.lora_down.weight.copy_(state[f"{name}.lora_down.weight"])
                lora.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])
                lora.alpha.copy_(state[f"{name}.alpha"])
                lora.scale = float(lora.alpha) / lora.lora_down.weight.shape[0]


def adding_hook(lora: nn.Module):
    """A forward hook that adds ``lora(input)`` to a base layer's output (in the output's dtype)."""
    def add_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora(args[0]).to(output.dtype)
    return add_delta


def build_lora_network(backend: TrainingBackend, config: LoraConfig) -> LoraNetwork:
    """Create (not yet attached) LoRA modules for the backend's UNet and, if asked, its CLIP text encoders."""
    network = LoraNetwork()
    for path, layer in unet_targets(backend.unet, config.targets):
        network.add(backend.kohya_unet_name(path), layer, config.rank, config.alpha)
    if config.train_text_encoder:
        parts = backend.text_encoders()
        usable = [p for p in parts if p.naming is TextEncoderNaming.HF_CLIP]
        skipped = [p.prefix for p in parts if p.naming is not TextEncoderNaming.HF_CLIP]
        if not usable:
            raise InputError("text-encoder LoRA needs a CLIP text encoder with transformers layer names; this model's "
                             "encoder is OpenCLIP (SD2.x). Turn off text-encoder training and train the UNet only.")
        if skipped:
            log.warning("text-encoder LoRA: skipping %s (OpenCLIP layout, fused attention); training %s",
                        ", ".join(skipped), ", ".join(p.prefix for p in usable))
        for part in usable:
            for name, layer in text_encoder_targets(part, config.targets):
                network.add(name, layer, config.rank, config.alpha, text_encoder=True)
    return network


class LoraMethod(MethodBase):
    """The LoRA training method: builds and attaches the network, exports kohya files."""

    name = "lora"

    @classmethod
    def from_config(cls, config, backend: TrainingBackend) -> "LoraMethod":
        return cls(backend, config.lora)

    def __init__(self, backend: TrainingBackend, config: LoraConfig):
        self.backend = backend
        self.config = config
        self.network = build_lora_network(backend, config)
        self.network.attach()

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.network.text_encoder_names)

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        unet, text = [], []
        for name, lora in self.network.loras.items():
            (text if name in self.network.text_encoder_names else unet).extend(lora.parameters())
        groups = [{"params": unet, "lr": learning_rate}]
        if text:
            groups.append({"params": text, "lr": self.config.text_encoder_lr or learning_rate})
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.network.kohya_state_dict()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_kohya_state_dict(state)

    def export(self, path: Path, info: ExportInfo, dtype: torch.dtype | None = None) -> Path:
        """Write the kohya file (``dtype`` overrides the configured save precision). Every tensor, the ``.alpha``
        scalars included, is in that precision, as kohya saves them (alphas are small integers or halves: exact in
        fp16/bf16)."""
        dtype = dtype or info.config.save_precision.dtype
        tensors = self.network.kohya_state_dict(dtype)
        return save_lora(path, tensors, kohya_metadata(info, self.config, self.trains_text_encoder))

    def load_trainable_file(self, path: Path) -> None:
        """Load weights from a kohya file written by ``export`` for this same network (strict)."""
        tensors, _ = load_lora(path)
        self.network.load_kohya_state_dict({k: v.float() for k, v in tensors.items()})

    def close(self) -> None:
        self.network.detach()

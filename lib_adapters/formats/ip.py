"""IP-Adapter files: variant, tokens, widths and the CLIP encoder they need, read from shapes.

Accepted layouts: the nested ``.bin`` (``{"image_proj": ..., "ip_adapter": ...}``, flattened by
the reader) and the flat ``.safetensors`` (``image_proj.*`` / ``ip_adapter.*``). FaceID files are
recognised by their keys and refused until supported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping

import torch

from ..errors import FormatError, IncompatibleModelError, UnsupportedModelError
from ..models.ip_adapter import IPAdapterModel, ProjectionConfig, ProjectionKind
from ..unet.layout import BoundLayout
from .detect import ModelFamily, detect_family
from .reader import read_weights
from .t2i import load_strict

StateDict = Mapping[str, torch.Tensor]
DIM_HEAD = 64  # Resampler heads are 64 wide in every released file (diffusers assumes the same)


class IPVariant(str, Enum):
    BASE = "base"  # also "light": same shapes, different training
    PLUS = "plus"  # also "plus-face"
    FULL_FACE = "full-face"


_VARIANT_OF_KIND = {ProjectionKind.LINEAR: IPVariant.BASE, ProjectionKind.RESAMPLER: IPVariant.PLUS,
                    ProjectionKind.MLP: IPVariant.FULL_FACE}


@dataclass(frozen=True)
class EncoderNeed:
    """What the adapter needs from a CLIP vision encoder."""

    hidden_states: bool  # penultimate hidden states (plus, full-face) or pooled image_embeds (base)
    width: int  # hidden size (hidden_states) or projection size (image_embeds)

    @property
    def description(self) -> str:
        names = {(False, 1024): "ViT-H/14", (False, 1280): "ViT-bigG/14", (True, 1280): "ViT-H/14",
                 (True, 1664): "ViT-bigG/14", (False, 768): "ViT-L/14", (True, 1024): "ViT-L/14"}
        kind = "hidden states" if self.hidden_states else "image embeddings"
        return f"{names.get((self.hidden_states, self.width), 'CLIP vision')} ({kind} of width {self.width})"


@dataclass(frozen=True)
class LoadedIPAdapter:
    name: str
    model: IPAdapterModel
    projection: ProjectionConfig
    variant: IPVariant
    site_hidden: dict[int, int]

    @property
    def encoder_need(self) -> EncoderNeed:
        return EncoderNeed(self.projection.kind.uses_hidden_states, self.projection.clip_dim)

    def check_compatible(self, bound: BoundLayout, label: str) -> None:
        sites = {s.number: s.hidden for s in bound.ip_sites()}
        context = self.projection.context_dim
        unet_context = _unet_context_dim(bound)
        if context != unet_context or sites != self.site_hidden:
            made_for = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}.get(context, f"a {context}-wide context")
            raise IncompatibleModelError(
                f"{label}: '{self.name}' is an IP-Adapter for {made_for} ({len(self.site_hidden)} attention "
                f"sites) but the loaded checkpoint is {bound.arch.value} ({len(sites)} sites, context "
                f"{unet_context}). Pick an IP-Adapter made for {bound.arch.value}.")


def _unet_context_dim(bound: BoundLayout) -> int:
    first = bound.ip_sites()[0]
    return int(bound.module(first.path).to_k.in_features)


def _split(sd: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    other = [k for k in sd if not k.startswith(("image_proj.", "ip_adapter."))]
    if other:
        raise FormatError(f"unexpected keys next to image_proj/ip_adapter: {', '.join(other[:3])}")
    return proj, ip


def _refuse_faceid(proj: StateDict, ip: StateDict, source: str) -> None:
    faceid = (any("_lora." in k for k in ip) or any(k.startswith("perceiver_resampler.") for k in proj)
              or ("proj.0.weight" in proj and "proj.3.weight" not in proj))
    if faceid:
        raise UnsupportedModelError(
            f"{source}: this is an IP-Adapter FaceID model, which needs InsightFace face embeddings and is not "
            "supported yet. Use a plus-face or full-face IP-Adapter instead.")


def projection_config(proj: StateDict, context_dim: int, source: str) -> ProjectionConfig:
    if "latents" in proj:
        layers = sorted({int(m.group(1)) for k in proj for m in [re.match(r"layers\.(\d+)\.", k)] if m})
        dim = int(proj["latents"].shape[2])
        return ProjectionConfig(
            kind=ProjectionKind.RESAMPLER, clip_dim=int(proj["proj_in.weight"].shape[1]), context_dim=context_dim,
            num_tokens=int(proj["latents"].shape[1]), resampler_dim=dim, resampler_depth=len(layers),
            resampler_heads=int(proj["layers.0.0.to_q.weight"].shape[0]) // DIM_HEAD,
            resampler_ff_mult=int(proj["layers.0.1.1.weight"].shape[0]) // dim)
    if "proj.3.weight" in proj:
        return ProjectionConfig(kind=ProjectionKind.MLP, clip_dim=int(proj["proj.0.weight"].shape[1]),
                                context_dim=context_dim, num_tokens=0)
    if "proj.weight" in proj:
        out = int(proj["proj.weight"].shape[0])
        if out % context_dim:
            raise FormatError(f"{source}: image_proj.proj gives {out} values, not a whole number of "
                              f"{context_dim}-wide tokens.")
        return ProjectionConfig(kind=ProjectionKind.LINEAR, clip_dim=int(proj["proj.weight"].shape[1]),
                                context_dim=context_dim, num_tokens=out // context_dim)
    raise FormatError(f"{source}: unknown IP-Adapter image projection (keys: {', '.join(sorted(proj)[:4])}).")


def ip_from_state_dict(sd: StateDict, name: str = "ip-adapter") -> LoadedIPAdapter:
    family, _, sd = detect_family(sd, name)
    if family is not ModelFamily.IP_ADAPTER:
        raise FormatError(f"{name}: this is a {family.value} file, not an IP-Adapter.")
    proj, ip = _split(sd)
    _refuse_faceid(proj, ip, name)
    numbers = sorted({int(m.group(1)) for k in ip for m in [re.match(r"(\d+)\.to_k_ip\.weight$", k)] if m})
    if not numbers:
        raise FormatError(f"{name}: no ip_adapter.N.to_k_ip weights found.")
    context_dim = int(ip[f"{numbers[0]}.to_k_ip.weight"].shape[1])
    cfg = projection_config(proj, context_dim, name)
    site_hidden = {n: int(ip[f"{n}.to_k_ip.weight"].shape[0]) for n in numbers}
    model = IPAdapterModel(cfg, site_hidden)
    load_strict(model, {f"image_proj.{k}": v for k, v in proj.items()} | {f"ip_adapter.{k}": v for k, v in ip.items()},
                name)
    return LoadedIPAdapter(name=name, model=model.eval().requires_grad_(False), projection=cfg,
                           variant=_VARIANT_OF_KIND[cfg.kind], site_hidden=site_hidden)


def load_ip_adapter(path: str | Path) -> LoadedIPAdapter:
    path = Path(path)
    return ip_from_state_dict(read_weights(path), name=path.stem)

"""IP-Adapter files: projection, tokens, widths and the CLIP encoder they need, read from shapes.

Accepted layouts: the nested ``.bin`` (``{"image_proj": ..., "ip_adapter": ...}``, flattened by
the reader) and the flat ``.safetensors`` (``image_proj.*`` / ``ip_adapter.*``). FaceID files share the
layout but are their own family (detected first, loaded by ``faceid.py``).

The parts every IP-Adapter family's files share are public here for ``faceid.py``: splitting a file
into its two halves (``split_ip_file``), the attention sites of its ``to_k_ip`` keys (``site_widths``),
a ``Resampler``'s depth and heads (``resampler_shape``) and the rule that a file's sites and context
width must be the UNet's (``check_ip_sites``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import FormatError, IncompatibleModelError
from ..models.clip_vision import EncoderNeed
from ..models.ip_adapter import IPAdapterModel, IPProjection, ProjectionConfig
from ..models.resampler import DIM_HEAD
from .detect import ModelFamily, detect_family
from .reader import read_weights
from .state_dict import StateDict, load_strict, numbered, shape_of, split_prefixes

if TYPE_CHECKING:  # only for annotations: formats never need the UNet's table
    from ..unet.layout import BoundLayout

_KV_KEY = r"(\d+)\.to_k_ip\.weight$"


@dataclass(frozen=True)
class LoadedIPAdapter:
    name: str
    model: IPAdapterModel
    projection: ProjectionConfig
    site_hidden: dict[int, int]

    @property
    def family(self) -> ModelFamily:
        return ModelFamily.IP_ADAPTER

    @property
    def variant(self) -> IPProjection:
        """Which IP-Adapter this is: its projection (plain, plus or full-face)."""
        return self.projection.kind

    @property
    def encoder_need(self) -> EncoderNeed:
        return EncoderNeed(self.projection.kind.uses_hidden_states, self.projection.clip_dim)

    def check_compatible(self, bound: "BoundLayout", label: str) -> None:
        check_ip_sites(self.name, self.projection.context_dim, self.site_hidden, bound, label)


def check_ip_sites(name: str, context_dim: int, site_hidden: dict[int, int], bound: "BoundLayout",
                   label: str) -> None:
    """``IncompatibleModelError`` unless an IP-Adapter file's context width and attention sites (number ->
    width) are those of the UNet: the rule for every IP-Adapter family."""
    unet_sites = bound.ip_sites()
    sites = {s.number: s.hidden for s in unet_sites}
    unet_context = int(bound.module(unet_sites[0].path).to_k.in_features)
    if context_dim != unet_context or sites != site_hidden:
        made_for = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}.get(context_dim, f"a {context_dim}-wide context")
        raise IncompatibleModelError(
            f"{label}: '{name}' is an IP-Adapter for {made_for} ({len(site_hidden)} attention "
            f"sites) but the loaded checkpoint is {bound.arch.value} ({len(sites)} sites, context "
            f"{unet_context}). Pick an IP-Adapter made for {bound.arch.value}.")


def split_ip_file(sd: StateDict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A flat IP-Adapter state dict -> (``image_proj`` keys, ``ip_adapter`` keys), each without its prefix."""
    proj, ip = split_prefixes(sd, ("image_proj", "ip_adapter"), source)
    return proj, ip


def site_widths(ip: StateDict, source: str) -> tuple[int, dict[int, int]]:
    """The context width the ``ip_adapter`` keys read and each site's width (file number -> ``to_k_ip`` rows)."""
    numbers = numbered(ip, _KV_KEY)
    if not numbers:
        raise FormatError(f"{source}: no ip_adapter.N.to_k_ip weights found.")
    context_dim = int(ip[f"{numbers[0]}.to_k_ip.weight"].shape[1])
    return context_dim, {n: int(ip[f"{n}.to_k_ip.weight"].shape[0]) for n in numbers}


def resampler_shape(proj: StateDict, prefix: str, dim: int, source: str) -> tuple[int, int, int]:
    """(depth, heads, feed-forward factor) of the ``Resampler`` whose ``image_proj`` keys start with ``prefix``."""
    depth = len(numbered(proj, rf"{re.escape(prefix)}layers\.(\d+)\.0\.to_q\."))
    heads = shape_of(proj, f"{prefix}layers.0.0.to_q.weight", source, "image_proj.")[0] // DIM_HEAD
    ff_mult = shape_of(proj, f"{prefix}layers.0.1.1.weight", source, "image_proj.")[0] // dim
    return depth, heads, ff_mult


def projection_config(proj: StateDict, context_dim: int, source: str) -> ProjectionConfig:
    if "latents" in proj:
        dim = int(proj["latents"].shape[2])
        depth, heads, ff_mult = resampler_shape(proj, "", dim, source)
        return ProjectionConfig(
            kind=IPProjection.PLUS, clip_dim=shape_of(proj, "proj_in.weight", source, "image_proj.")[1],
            context_dim=context_dim, num_tokens=int(proj["latents"].shape[1]), resampler_dim=dim,
            resampler_depth=depth, resampler_heads=heads, resampler_ff_mult=ff_mult)
    if "proj.3.weight" in proj:
        return ProjectionConfig(kind=IPProjection.FULL_FACE, clip_dim=int(proj["proj.0.weight"].shape[1]),
                                context_dim=context_dim, num_tokens=0)
    if "proj.weight" in proj:
        out = int(proj["proj.weight"].shape[0])
        if out % context_dim:
            raise FormatError(f"{source}: image_proj.proj gives {out} values, not a whole number of "
                              f"{context_dim}-wide tokens.")
        return ProjectionConfig(kind=IPProjection.PLAIN, clip_dim=int(proj["proj.weight"].shape[1]),
                                context_dim=context_dim, num_tokens=out // context_dim)
    raise FormatError(f"{source}: unknown IP-Adapter image projection (keys: {', '.join(sorted(proj)[:4])}).")


def ip_from_state_dict(sd: StateDict, name: str = "ip-adapter") -> LoadedIPAdapter:
    family, _, sd = detect_family(sd, name)
    if family is not ModelFamily.IP_ADAPTER:
        raise FormatError(f"{name}: this is a {family.value} file, not an IP-Adapter.")
    proj, ip = split_ip_file(sd, name)
    context_dim, site_hidden = site_widths(ip, name)
    cfg = projection_config(proj, context_dim, name)
    model = IPAdapterModel(cfg, site_hidden)
    load_strict(model, {f"image_proj.{k}": v for k, v in proj.items()} | {f"ip_adapter.{k}": v for k, v in ip.items()},
                name)
    return LoadedIPAdapter(name=name, model=model.eval().requires_grad_(False), projection=cfg,
                           site_hidden=site_hidden)


def load_ip_adapter(path: str | Path) -> LoadedIPAdapter:
    path = Path(path)
    return ip_from_state_dict(read_weights(path), name=path.stem)

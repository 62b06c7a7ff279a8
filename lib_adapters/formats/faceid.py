"""IP-Adapter FaceID files: which FaceID, for which base, read from keys and shapes.

The files are IP-Adapter files (``image_proj.*`` / ``ip_adapter.*``, nested ``.bin`` or flat
``.safetensors``, read as ``formats/ip.py`` reads them) whose projection takes a face embedding:

=================  ==========================================================  ============
variant            ``image_proj``                                              tokens
=================  ==========================================================  ============
FaceID             ``proj.0`` [1024, 512], ``proj.2`` [4 D, 1024], ``norm``    4
FaceID Portrait    the same with ``proj.2`` [16 D, 1024], no LoRA               16 per face
Portrait unnorm    a Plus ``Resampler`` (``latents`` ...) with ``proj_in`` [.., 512]  16 per face
FaceID Plus (v2)   FaceID's keys + ``perceiver_resampler.*`` over CLIP ViT-H   4
=================  ==========================================================  ============

D is the UNet's context width (768 SD1.5, 2048 SDXL), read with the site count from ``to_k_ip``.
FaceID and FaceID Plus files also hold, in ``ip_adapter``, the LoRA the reference trained with every
attention processor (``{n}.to_{q,k,v,out}_lora.{down,up}.weight``; even n: self-attention, odd n:
the cross-attention of IP site n); they are read into ``AttentionLoRA`` records, so every key is
consumed. Plus and Plus v2 have identical keys: v2 (trained with the shortcut) can only be told by
its name ("v2" in it, as every front end does) or by the caller.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from ..errors import FormatError
from ..models.clip_vision import EncoderNeed
from ..models.faceid import FaceIDAdapterModel, FaceIDConfig, FaceIDVariant
from .detect import ModelFamily, detect_family
from .faceid_keys import LORA_KEY as _LORA_KEY
from .faceid_keys import variant_of_keys
from .ip import check_ip_sites, resampler_shape, site_widths, split_ip_file
from .reader import read_state_dict
from .state_dict import StateDict, load_strict, shape_of

if TYPE_CHECKING:  # only for annotations: formats never need the UNet's table
    from ..unet.layout import BoundLayout

PORTRAIT_TOKENS = 16
LORA_PARTS = ("q", "k", "v", "out")
_KV_KEY = re.compile(r"(\d+)\.to_(k|v)_ip\.weight$")


@dataclass(frozen=True)
class AttentionLoRA:
    """One attention processor's LoRA as the reference trained it: ``W + up @ down`` for q, k, v, out."""

    number: int  # even: the self-attention before IP site number + 1; odd: the cross-attention of IP site number
    rank: int
    down: Mapping[str, torch.Tensor]  # "q" | "k" | "v" | "out" -> [rank, in]
    up: Mapping[str, torch.Tensor]  # -> [out, rank]

    @property
    def is_cross_attention(self) -> bool:
        return self.number % 2 == 1

    def delta(self, part: str) -> torch.Tensor:
        return self.up[part].float() @ self.down[part].float()


@dataclass(frozen=True)
class LoadedFaceIDAdapter:
    """A FaceID file, ready for the IP-Adapter runtime (``model.image_proj``, ``model.site(n)``)."""

    name: str
    model: FaceIDAdapterModel
    config: FaceIDConfig
    site_hidden: dict[int, int]
    lora: dict[int, AttentionLoRA] = field(default_factory=dict)  # processor number -> its LoRA; {} for Portrait

    @property
    def family(self) -> ModelFamily:
        return ModelFamily.IP_FACEID

    @property
    def variant(self) -> FaceIDVariant:
        return self.config.variant

    @property
    def encoder_need(self) -> EncoderNeed | None:
        """Plus needs CLIP hidden states of the aligned face crop; the others no CLIP encoder at all."""
        return EncoderNeed(hidden_states=True, width=self.config.clip_dim) if self.variant.uses_clip else None

    @property
    def shortcut(self) -> bool:
        return self.variant.shortcut

    @property
    def normed_embedding(self) -> bool:
        """Feed ``FaceResult.normed_embedding`` (True) or the raw ``embedding`` (Portrait unnorm)."""
        return self.variant.normed_embedding

    @property
    def tokens_per_face(self) -> int:
        return self.config.num_tokens

    def check_compatible(self, bound: "BoundLayout", label: str) -> None:
        check_ip_sites(self.name, self.config.context_dim, self.site_hidden, bound, label)

    def tokens(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None = None,
               s_scale: float = 1.0) -> torch.Tensor:
        """Context tokens [N, tokens_per_face, D] for N faces ([N, 512] embeddings; Plus: and their
        crops' CLIP hidden states [N, 257, 1280]). The "no face" tokens are ``tokens(zeros, empty_clip)``."""
        with torch.no_grad():
            clip = clip_hidden.float() if clip_hidden is not None else None
            return self.model.image_proj(face_embeds.float(), clip, s_scale=s_scale)


def _perceiver_fields(proj: StateDict, prefix: str, dim: int, source: str) -> dict[str, int]:
    depth, heads, ff_mult = resampler_shape(proj, prefix, dim, source)
    return dict(perceiver_dim=dim, perceiver_depth=depth, perceiver_heads=heads, perceiver_ff_mult=ff_mult)


def faceid_config(proj: StateDict, keys: FaceIDVariant, context_dim: int, name: str,
                  plus_v2: bool | None = None) -> FaceIDConfig:
    """The config of a FaceID ``image_proj`` whose keys show ``keys`` (``variant_of_keys``); a Plus file is
    Plus v2 when ``plus_v2`` says so, or when it is None and the name has "v2" in it."""
    shape = lambda key: shape_of(proj, key, name, "image_proj.")  # noqa: E731
    if keys is FaceIDVariant.PORTRAIT_UNNORM:
        latents = shape("latents")
        return FaceIDConfig(keys, context_dim=context_dim, num_tokens=latents[1], id_dim=shape("proj_in.weight")[1],
                            id_hidden=0, **_perceiver_fields(proj, "", latents[2], name))
    hidden, id_dim = shape("proj.0.weight")
    out = shape("proj.2.weight")[0]
    width = shape("norm.weight")[0]
    if width != context_dim or out % width:
        raise FormatError(f"{name}: image_proj gives tokens {width} wide ({out} values) but ip_adapter expects "
                          f"{context_dim}-wide context tokens; the file mixes two models.")
    if keys is not FaceIDVariant.PLUS:
        variant = FaceIDVariant.PORTRAIT if out // width == PORTRAIT_TOKENS else FaceIDVariant.FACEID
        return FaceIDConfig(variant, context_dim=context_dim, num_tokens=out // width, id_dim=id_dim, id_hidden=hidden)
    pre = "perceiver_resampler."
    dim, clip_dim = shape(pre + "proj_in.weight")
    if dim != context_dim or shape(pre + "proj_out.weight")[0] != context_dim:
        raise FormatError(f"{name}: the FaceID Plus perceiver is {dim} wide, expected the context width "
                          f"{context_dim}; the file is not a FaceID Plus model this extension knows.")
    v2 = ("v2" in name.lower()) if plus_v2 is None else plus_v2
    return FaceIDConfig(FaceIDVariant.PLUS_V2 if v2 else FaceIDVariant.PLUS, context_dim=context_dim,
                        num_tokens=out // width, id_dim=id_dim, id_hidden=hidden, clip_dim=clip_dim,
                        **_perceiver_fields(proj, pre, dim, name))


def _split_ip(ip: StateDict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``ip_adapter`` keys -> (to_k_ip/to_v_ip, LoRA); anything else is a ``FormatError``."""
    kv = {k: v for k, v in ip.items() if _KV_KEY.match(k)}
    lora = {k: v for k, v in ip.items() if _LORA_KEY.match(k)}
    other = sorted(set(ip) - set(kv) - set(lora))
    if other:
        raise FormatError(f"{source}: unexpected ip_adapter keys in a FaceID file: {', '.join(other[:3])}. The file is "
                          "damaged or a variant this extension does not know.")
    return kv, lora


def _lora_records(lora: StateDict, site_hidden: dict[int, int], context_dim: int, source: str
                  ) -> dict[int, AttentionLoRA]:
    if not lora:
        return {}
    numbers = sorted({int(_LORA_KEY.match(k).group(1)) for k in lora})  # type: ignore[union-attr]
    expected = list(range(2 * len(site_hidden)))
    if numbers != expected or sorted(site_hidden) != expected[1::2]:
        raise FormatError(f"{source}: the FaceID LoRA covers attention processors {numbers[:4]}..{numbers[-1]}, "
                          f"expected 0..{expected[-1]} (every self- and cross-attention); the file is incomplete.")
    records = {}
    downs = [v for k, v in lora.items() if k.endswith(".down.weight")]
    rank = int(downs[0].shape[0]) if downs else 0  # no down weights: the first check below names one
    for n in numbers:
        hidden = site_hidden[n + 1 - n % 2]
        kv_in = context_dim if n % 2 else hidden
        down, up = {}, {}
        for part in LORA_PARTS:
            width = kv_in if part in ("k", "v") else hidden
            for side, shape, store in (("down", (rank, width), down), ("up", (hidden, rank), up)):
                key = f"{n}.to_{part}_lora.{side}.weight"
                if key not in lora or tuple(lora[key].shape) != shape:
                    found = tuple(lora[key].shape) if key in lora else "missing"
                    raise FormatError(f"{source}: ip_adapter.{key} is {found}, expected {shape}; the FaceID LoRA "
                                      "does not fit the file's attention sites.")
                store[part] = lora[key]
        records[n] = AttentionLoRA(number=n, rank=rank, down=down, up=up)
    return records


def faceid_from_state_dict(sd: StateDict, name: str = "ip-adapter-faceid", plus_v2: bool | None = None
                           ) -> LoadedFaceIDAdapter:
    """Load a flat FaceID state dict; ``plus_v2`` overrides the name's hint for Plus files."""
    family, _, sd = detect_family(sd, name)
    if family is ModelFamily.IP_ADAPTER:
        raise FormatError(f"{name}: this IP-Adapter takes CLIP image features, not a face embedding; it is not a "
                          "FaceID model. Load it as a regular IP-Adapter.")
    if family is not ModelFamily.IP_FACEID:
        raise FormatError(f"{name}: this is a {family.value} file, not an IP-Adapter FaceID.")
    proj, ip = split_ip_file(sd, name)
    keys = variant_of_keys(proj)
    if keys is None:  # LoRA keys but a projection of no FaceID: the file mixes two models
        raise FormatError(f"{name}: this file holds a FaceID LoRA but an image projection of no FaceID model "
                          f"(keys: {', '.join(sorted(proj)[:4])}); it is damaged or mixes two models.")
    kv, lora = _split_ip(ip, name)
    context_dim, site_hidden = site_widths(kv, name)
    cfg = faceid_config(proj, keys, context_dim, name, plus_v2)
    model = FaceIDAdapterModel(cfg, site_hidden)
    load_strict(model, {f"image_proj.{k}": v for k, v in proj.items()} | {f"ip_adapter.{k}": v for k, v in kv.items()},
                name)
    return LoadedFaceIDAdapter(name=name, model=model.eval().requires_grad_(False), config=cfg,
                               site_hidden=site_hidden, lora=_lora_records(lora, site_hidden, context_dim, name))


def load_faceid_adapter(path: str | Path, plus_v2: bool | None = None) -> LoadedFaceIDAdapter:
    path = Path(path)
    return faceid_from_state_dict(read_state_dict(path), name=path.stem, plus_v2=plus_v2)

"""The IP-Adapter FaceID family: face tokens once per job, the IP attention at every attn2, and the model's LoRA.

A FaceID unit is an IP-Adapter unit whose image tokens come from a face: the reference images go
through face analysis (``faces.py``: detect, pick the largest face or the n-th from the left, align,
ArcFace embedding), and the file's projection turns the embedding (FaceID Plus: with the CLIP ViT-H
hidden states of the 224 aligned crop, through the encoder machinery and its caches) into context
tokens. From there it is ``IPUnitRuntime``: the same decoupled attention at every attn2, cond rows
on the face tokens, uncond rows on the "no face" tokens (the projection of a zero embedding, and for
Plus of the encoder's zero image), as the reference computes them.

Several photos of one person: FaceID and Plus average the embeddings (and Plus the crops' hidden
states) before the projection (ComfyUI_IPAdapter_plus's "average"), or with "Concatenate" put each
face's tokens side by side (as diffusers does with several images); Portrait, trained on several
faces, always concatenates. Plus v2's structure weight ``s_scale`` scales what CLIP adds to the
identity tokens.

The LoRA that goes with FaceID and FaceID Plus models (``Point.WEIGHTS``, for the whole generation):
from the paired ``<model>_lora.safetensors`` beside the model or in a Lora folder when there is one
(the file every front end uses), else from the model file itself (the same weights, which the
reference and diffusers apply); unless the prompt already applies the paired file with
``<lora:...>`` (as sd-webui-controlnet asks its users to), which would apply it twice. Its strength
is a unit option of its own (``faceid_lora_weight``, 1 = as trained), not the unit's weight: the
reference trained the two together at scale 1 and scales only the image branch with its ``scale``;
ComfyUI_IPAdapter_plus gives the LoRA its own ``lora_strength`` and sd-webui-controlnet leaves it
to the prompt's ``<lora:name:strength>``, so users of both know it as a separate knob.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..formats.detect import ModelFamily
from ..formats.faceid import LoadedFaceIDAdapter
from ..formats.faceid_lora import PAIRED_SUFFIX, infile_deltas, paired_deltas, read_paired_lora
from ..formats.reader import SAFETENSORS_SUFFIXES
from ..models.clip_vision import CropMode
from ..models.faceid import FACE_EMBEDDING_DIM, FaceIDVariant
from ..unet.layout import BoundLayout
from ..unet.points import LowRankDelta, Point, WeightDelta
from .build import BuildContext, Family
from .cache import FileKey
from .encodings import EncodingKey, EncoderOutput
from .faces import Face, FaceKey
from .ip import IPUnitRuntime
from .units import AdapterUnit, MultiImage

LORA_VARIANTS = (FaceIDVariant.FACEID, FaceIDVariant.PLUS, FaceIDVariant.PLUS_V2)  # released with a LoRA


@dataclass
class FaceIDUnitRuntime(IPUnitRuntime):
    lora: dict[str, LowRankDelta] = field(default_factory=dict)  # parameter path -> delta, for the generation

    points = frozenset({Point.ATTENTION, Point.WEIGHTS})

    def weight_deltas(self, bound: BoundLayout) -> dict[str, WeightDelta]:
        return dict(self.lora)


def combine_mode(adapter: LoadedFaceIDAdapter, asked: MultiImage) -> MultiImage:
    return MultiImage.CONCAT if adapter.variant in (FaceIDVariant.PORTRAIT, FaceIDVariant.PORTRAIT_UNNORM) else asked


def face_tokens(adapter: LoadedFaceIDAdapter, embeds: torch.Tensor, clip: torch.Tensor | None,
                empty_clip: torch.Tensor | None, combine: MultiImage, s_scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The face tokens [1, T, context] of N faces ([N, 512] embeddings; Plus: their crops' CLIP hidden states
    [N, 257, 1280] and the zero image's [1, 257, 1280]) and the "no face" tokens of the same shape."""
    if combine is MultiImage.AVERAGE:
        embeds = embeds.mean(dim=0, keepdim=True)
        clip = clip.mean(dim=0, keepdim=True) if clip is not None else None
    tokens = adapter.tokens(embeds, clip, s_scale)
    tokens = tokens.reshape(1, -1, tokens.shape[-1])
    empty = adapter.tokens(torch.zeros(1, FACE_EMBEDDING_DIM), empty_clip, s_scale)
    return tokens, empty.repeat(1, tokens.shape[1] // empty.shape[1], 1)


@dataclass(frozen=True)
class FaceTokenKey:
    """A FaceID unit's tokens in the encoding cache: the file, the faces, the CLIP encoding (Plus), how combined."""

    adapter: FileKey
    faces: tuple[FaceKey, ...]
    clip: EncodingKey | None
    combine: MultiImage
    s_scale: float


def cached_face_tokens(ctx: BuildContext, adapter: LoadedFaceIDAdapter, file: Path, faces: Sequence[Face],
                       unit: AdapterUnit) -> tuple[torch.Tensor, torch.Tensor]:
    combine = combine_mode(adapter, unit.multi_image)
    s_scale = unit.s_scale if adapter.shortcut else 1.0  # only Plus v2 reads it: other values share an entry
    encoder, crops = None, []
    if adapter.encoder_need is not None:  # Plus: the aligned crops through the ViT-H encoder
        need = adapter.encoder_need
        encoder = ctx.reference_encoder(ctx.encoders.find(need.hidden_states, need.width, need.description))
        crops = [face.crop for face in faces]
    clip_key = encoder.encoding_key(crops, CropMode.CENTER, EncoderOutput.PENULTIMATE) if encoder else None
    key = FaceTokenKey(FileKey.of(file), tuple(face.key for face in faces), clip_key, combine, s_scale)

    def compute() -> torch.Tensor:
        embeds = torch.stack([face.normed_embedding if adapter.normed_embedding else face.embedding
                              for face in faces])
        clip = empty_clip = None
        if encoder is not None:
            clip, empty_clip = encoder.ip_outputs(crops, CropMode.CENTER, hidden_states=True)
        tokens, empty = face_tokens(adapter, embeds, clip, empty_clip, combine, s_scale)
        return torch.cat([tokens, empty])

    both = ctx.encodings.get(key, compute)
    return both[:1], both[1:]


def find_paired_lora(adapter_file: Path, lora_dirs: Sequence[Path]) -> Path | None:
    """``<model>_lora.safetensors`` beside the model file, else anywhere in the Lora folders (any letter case)."""
    wanted = {f"{adapter_file.stem}{PAIRED_SUFFIX}{suffix}".lower() for suffix in SAFETENSORS_SUFFIXES}
    beside = sorted(p for p in adapter_file.parent.iterdir() if p.name.lower() in wanted and p.is_file())
    if beside:
        return beside[0]
    for folder in lora_dirs:
        if Path(folder).is_dir():
            for path in sorted(Path(folder).rglob("*")):
                if path.name.lower() in wanted and path.is_file():
                    return path
    return None


def lora_deltas(ctx: BuildContext, label: str, unit: AdapterUnit, adapter: LoadedFaceIDAdapter,
                file: Path) -> dict[str, LowRankDelta]:
    """The deltas of the model's LoRA at the unit's strength; {} when turned off, not there or in the prompt."""
    if not unit.faceid_lora or unit.faceid_lora_weight == 0 or adapter.variant not in LORA_VARIANTS:
        return {}
    paired = find_paired_lora(file, ctx.lora_dirs)
    if paired is not None:
        if paired.stem.lower() in ctx.prompt_loras:
            ctx.note(label, f"the prompt applies <lora:{paired.stem}> itself, so the unit does not apply it again")
            return {}
        lora = ctx.models.get("faceid_lora", paired, read_paired_lora)
        return paired_deltas(lora, ctx.bound, unit.faceid_lora_weight, label)
    if adapter.lora:
        return infile_deltas(adapter.lora, ctx.bound, unit.faceid_lora_weight, adapter.name, label)
    ctx.note(label, f"no LoRA for {adapter.name}: the file holds none and {file.stem}{PAIRED_SUFFIX}.safetensors is "
                    f"neither beside it nor in the Lora folder; the unit runs without it (put the LoRA released with "
                    "the model there for its full effect)")
    return {}


def build(ctx: BuildContext, label: str, unit: AdapterUnit, adapter: LoadedFaceIDAdapter, file: Path
          ) -> FaceIDUnitRuntime:
    """Find the faces and make their tokens (both cached), and the LoRA's deltas; the tokens serve every step."""
    adapter.check_compatible(ctx.bound, label)
    service = ctx.inputs.face_service()
    faces = service.faces(label, ctx.inputs.source_images(label, unit), unit.face_pack, unit.face_index,
                          crops=adapter.encoder_need is not None)
    tokens, empty = cached_face_tokens(ctx, adapter, file, faces, unit)
    return FaceIDUnitRuntime(label, adapter, tokens, empty, weight=unit.weight, start=unit.start,  # type: ignore[arg-type]
                             end=unit.end, mask=ctx.inputs.mask(label, unit.mask),
                             lora=lora_deltas(ctx, label, unit, adapter, file))


FIELDS = ("model", "weight", "start", "end", "face_index", "multi_image", "faceid_lora", "faceid_lora_weight",
          "s_scale", "face_pack")


def written(unit: AdapterUnit, adapter: LoadedFaceIDAdapter, ctx: BuildContext) -> tuple[tuple[str, ...], AdapterUnit]:
    """Its own fields only: the structure weight for Plus v2, the LoRA for the variants that have one, the
    multi-image mode where it is a choice; the pack as resolved (Settings' when the unit names none)."""
    skip = set()
    if not adapter.shortcut:
        skip.add("s_scale")
    if adapter.variant not in LORA_VARIANTS:
        skip |= {"faceid_lora", "faceid_lora_weight"}
    if combine_mode(adapter, MultiImage.AVERAGE) is MultiImage.CONCAT:
        skip.add("multi_image")
    service = ctx.inputs.faces
    pack = unit.face_pack or (service.pack if service is not None else "")
    return tuple(f for f in FIELDS if f not in skip), replace(unit, face_pack=pack)


FAMILY = Family("IP-Adapter FaceID", (ModelFamily.IP_FACEID,), FIELDS, build, written)

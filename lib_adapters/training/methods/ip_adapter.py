"""IP-Adapter training (plain, Plus and FaceID, SD1.x/SD2.x and SDXL, ldm and diffusers UNets): the image projection
and per-attn2 ``to_k_ip``/``to_v_ip`` (FaceID: and the attention LoRA), everything else frozen.

The recipe is the reference's (tencent-ailab ``tutorial_train.py`` / ``tutorial_train_plus.py``):
``to_k_ip``/``to_v_ip`` start as copies of the site's ``to_k``/``to_v``; each sample is trained without
its image (the reference's uncond: zero ``image_embeds``, or the encoder's output for an all-zero input
for Plus), without its caption, or without both, at the configured rates, drawn from the run's seeded
generator so that a resumed run draws the same. Image tokens reach the UNet through the panel's own
``GenerationSession`` and the backend's binding (the attn2 wrapper of ``unet/a1111.py``, or on Forge the
panel's Forge patches, ``unet/forge.py``); only the unit below differs from the
panel's: its keys and values are per batch row and keep their gradients. The UNet is never modified:
``close()`` removes the wrappers, and the CLIP vision encoder is the run's own frozen copy.

FaceID (``tutorial_train_faceid.py``) reads each image's face embedding (``face_data.py``) instead of CLIP
features, drops the image as a zero embedding, and trains a LoRA on every attention with the adapter
(``faceid.py``); its unit applies that LoRA's ``to_out`` part to the image branch as well.

The exported file is the reference's flat safetensors layout (``image_proj.*``, ``ip_adapter.{1,3,5,...}``
numbered as diffusers' ``attn_processors``; FaceID's LoRA as ``ip_adapter.{0,1,2,...}.to_*_lora``), which our
panel, diffusers and sd-webui-controlnet load.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...arch import BaseArch
from ...errors import FormatError, IncompatibleModelError
from ...formats.ip import LoadedIPAdapter
from ...formats.state_dict import load_strict
from ...inference.ip import IPUnitRuntime, fold_key_value
from ...inference.session import GenerationSession
from ...models.clip_vision import ClipVisionEncoder
from ...models.faceid import FACE_EMBEDDING_DIM
from ...models.ip_adapter import IPAdapterModel, ProjectionConfig
from ...models.resampler import DIM_HEAD
from ...unet.layout import IPSite
from ..backends.base import TrainingBackend
from ..config import IPAdapterConfig, IPProjection, TrainConfig
from ..data import DatasetInvalidError, ImageRecord, dataset_root
from ..face_data import CACHE_FOLDER as FACE_CACHE
from ..face_data import FaceEmbeddings
from ..ip_data import (ImageFeatures, encoder_width, load_json_records, load_training_encoder,
                       reference_encoder)
from ..named_files import load_faceid_start, load_ip_start
from ..nonfinite import InputSource, NonFiniteInput, bad_rows, kind, shown, unique, weights_advice
from ..outputs import atomic_write
from .base import ExportInfo, MethodBase, MethodBatch
from .faceid import (FACEID_TOKENS, FaceIDTrainingModel, LoRAHooks, faceid_config, file_state, layer_shapes,
                     new_faceid_model)
from .ip_sites import copy_key_values, ip_layout

log = logging.getLogger(__name__)

_TOKENS = {IPProjection.PLAIN: 4, IPProjection.PLUS: 16}  # fixed by diffusers' and sd-webui-controlnet's loaders


@dataclass
class TrainingIPUnit(IPUnitRuntime):
    """The panel's IP unit with per-row tokens that keep their gradients; inactive (scale 0) between batches."""

    tokens: torch.Tensor | None = None  # [rows, T, context]: this batch's projected image tokens

    def scale_at(self, site: IPSite) -> float:
        return 0.0 if self.tokens is None else 1.0

    def key_value(self, site: IPSite, cond_mask: torch.Tensor | None, like: torch.Tensor, heads: int,
                  out_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tokens is not None and self.tokens.shape[0] == like.shape[0], "one token set per batch row"
        kv = self.adapter.model.site(site.number)
        k, v = fold_key_value(kv.to_k_ip(self.tokens), kv.to_v_ip(self.tokens), heads, out_weight)
        return k.to(like.dtype), v.to(like.dtype)

    def attention(self, site: IPSite, attn: nn.Module, q: torch.Tensor, call) -> torch.Tensor:
        """The panel's term, except where FaceID's LoRA acts on ``to_out``: the reference adds the image branch
        before ``to_out``, so its LoRA sees it too, and ``W_out`` cannot be folded into the values as one matrix."""
        kv = self.adapter.model.site(site.number)
        out_lora = getattr(kv, "to_out_lora", None)
        if out_lora is None or self.tokens is None:
            return super().attention(site, attn, q, call)
        rows, heads, count, head_dim = q.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [rows, T, inner] -> [rows, heads, T, head_dim]
            return t.reshape(rows, -1, heads, head_dim).transpose(1, 2).to(q.dtype)

        h = F.scaled_dot_product_attention(q, split(kv.to_k_ip(self.tokens)), split(kv.to_v_ip(self.tokens)))
        h = h.transpose(1, 2).reshape(rows, count, heads * head_dim)
        out = F.linear(h, attn.to_out[0].weight.to(h.dtype)) + out_lora(h).to(h.dtype)
        return out * self.scale_at(site)

    def release(self) -> None:  # the panel's release moves the model to the CPU; training keeps it in place
        self.tokens = None


@dataclass(frozen=True)
class Drops:
    """Which parts of one sample the reference's dropout removed."""

    image: bool
    text: bool


def draw_drops(n: int, config: IPAdapterConfig, generator: torch.Generator) -> list[Drops]:
    """One uniform draw per sample, split as the reference does: image only, text only, both, neither."""
    u = torch.rand(n, generator=generator).tolist()
    image_only, text_only = config.image_drop, config.image_drop + config.text_drop
    both = text_only + config.both_drop
    return [Drops(image=x < image_only or text_only <= x < both, text=image_only <= x < both) for x in u]


def _projection_config(config: IPAdapterConfig, clip_dim: int, context_dim: int, sdxl: bool) -> ProjectionConfig:
    kind = config.projection
    if kind is IPProjection.PLAIN:
        return ProjectionConfig(kind, clip_dim=clip_dim, context_dim=context_dim, num_tokens=_TOKENS[config.projection])
    dim = config.resampler_dim or (1280 if sdxl and context_dim == 2048 else context_dim)
    return ProjectionConfig(kind, clip_dim=clip_dim, context_dim=context_dim, num_tokens=_TOKENS[config.projection],
                            resampler_dim=dim, resampler_depth=config.resampler_depth,
                            resampler_heads=max(1, dim // DIM_HEAD))


def new_adapter(projection: ProjectionConfig, sites: tuple[IPSite, ...], bound) -> IPAdapterModel:
    """A fresh adapter: torch's default initialisation for the projection (the reference's), and each site's
    ``to_k_ip``/``to_v_ip`` copied from its ``to_k``/``to_v``."""
    model = IPAdapterModel(projection, {s.number: s.hidden for s in sites})
    copy_key_values(model, sites, bound)
    return model


class IPAdapterMethod(MethodBase):
    name = "ip_adapter"

    @classmethod
    def from_config(cls, config: TrainConfig, backend: TrainingBackend) -> "IPAdapterMethod":
        if config.ip.faceid:  # always cached: the reference, too, reads one stored embedding per image
            return cls(backend, config.ip, config.cache_dir / FACE_CACHE)
        return cls(backend, config.ip, config.cache_dir / "clip-features" if config.ip.cache_features else None)

    @classmethod
    def load_records(cls, config: TrainConfig) -> list[ImageRecord]:
        """The dataset's records; FaceID: each image's face analysed (once: cached), every image without one (and
        a sample image without one) listed before the run starts."""
        records = cls.dataset_records(config)
        if config.ip.faceid:
            paths = [r.path for r in records]
            if config.sample_every and config.sample_image is not None:
                paths.append(config.sample_image)
            problems = FaceEmbeddings(config.ip, config.cache_dir / FACE_CACHE).problems(paths)
            if problems:
                raise DatasetInvalidError(config.ip.data_root or dataset_root(config.dataset_dir), problems)
        return records

    @classmethod
    def dataset_records(cls, config: TrainConfig) -> list[ImageRecord]:
        """A ``.json`` dataset path is the reference's list; a folder is the usual image + caption folder."""
        if config.dataset_dir.suffix.lower() == ".json":
            return load_json_records(config.dataset_dir, config.ip.data_root, config.min_image_size)
        return super().load_records(config)

    def __init__(self, backend: TrainingBackend, config: IPAdapterConfig, feature_cache: Path | None = None):
        self.backend, self.config = backend, config
        self.bound = ip_layout(backend)
        sites = self.bound.ip_sites()
        context_dim = int(self.bound.module(sites[0].path).to_k.in_features)
        self.encoder: ClipVisionEncoder | None = None
        if config.faceid:
            model = self._faceid_parts(sites, context_dim, feature_cache)
        else:
            model = self._clip_parts(sites, context_dim, feature_cache)
        self.model = model.float().to(backend.device).requires_grad_(True).train()
        self.lora_hooks = LoRAHooks(self.model, self.bound, sites) if config.faceid else None
        if self.lora_hooks is not None:
            self.lora_hooks.attach()
        self._install(sites)
        self._drops: tuple[MethodBatch, list[Drops]] | None = None

    def _clip_parts(self, sites: tuple[IPSite, ...], context_dim: int, cache: Path | None) -> IPAdapterModel:
        """Plain and Plus: the CLIP vision encoder, its features, and the adapter (new, or the file to fine-tune)."""
        config, backend = self.config, self.backend
        # the file to fine-tune, with the checks a request gets before the run starts (named_files.py)
        start = load_ip_start(config) if config.init_from is not None else None
        need = start.encoder_need if start is not None else reference_encoder(config.projection, backend.arch)
        self.encoder = load_training_encoder(config, need)
        self.encoder.model.to(backend.device)
        hidden_states = config.projection is IPProjection.PLUS
        width = encoder_width(self.encoder, hidden_states)
        self.features = ImageFeatures(self.encoder, hidden_states, cache)
        self.init_name = start.name if start is not None else ""
        if start is None:
            self.projection = _projection_config(config, width, context_dim, backend.arch is BaseArch.SDXL)
            return new_adapter(self.projection, sites, self.bound)
        if width != start.projection.clip_dim:
            raise IncompatibleModelError(
                f"{start.name} needs a {start.encoder_need.description} CLIP vision encoder, but "
                f"{self.encoder.name} gives width {width}; choose the encoder it was trained with")
        start.check_compatible(self.bound, "IP-Adapter training")
        self.projection = start.projection
        return start.model

    def _faceid_parts(self, sites: tuple[IPSite, ...], context_dim: int, cache: Path | None) -> FaceIDTrainingModel:
        """FaceID: the face embeddings and the model (projection, to_k_ip/to_v_ip, attention LoRA)."""
        config = self.config
        self.features = FaceEmbeddings(config, cache)
        self.projection = ProjectionConfig(IPProjection.FACEID, clip_dim=FACE_EMBEDDING_DIM, context_dim=context_dim,
                                           num_tokens=FACEID_TOKENS)
        self.init_name = ""
        if config.init_from is None:
            return new_faceid_model(self.bound, sites, context_dim, config.lora_rank)
        start = load_faceid_start(config)
        start.check_compatible(self.bound, "IP-Adapter FaceID training")
        model = FaceIDTrainingModel(faceid_config(context_dim), layer_shapes(self.bound, sites), config.lora_rank)
        load_strict(model, file_state(start), str(config.init_from))
        self.init_name = start.name
        return model

    def _install(self, sites: tuple[IPSite, ...]) -> None:
        adapter = LoadedIPAdapter("training", self.model, self.projection, {s.number: s.hidden for s in sites})
        empty = torch.zeros(1, 1, self.projection.context_dim)
        self.unit = TrainingIPUnit("IP-Adapter training", adapter, empty, empty)
        self.binding = self.backend.bind(GenerationSession(self.bound, [self.unit]))
        self.binding.install()

    # -- per batch ------------------------------------------------------------------------------------
    @property
    def trains_text_encoder(self) -> bool:
        return False

    def drops(self, batch: MethodBatch) -> list[Drops]:
        """Drawn once per batch (the loop asks for captions, then for the UNet context, of the same batch)."""
        if self._drops is None or self._drops[0] is not batch:
            self._drops = (batch, draw_drops(batch.total, self.config, batch.generator)[batch.rows])
        return self._drops[1]

    def captions(self, batch: MethodBatch, captions: list[str]) -> list[str]:
        return ["" if d.text else c for d, c in zip(self.drops(batch), captions)]

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Projected tokens [B, T, context] of CLIP features (fp32 parameters; autocast applies if active)."""
        return self.model.image_proj(features.to(self.backend.device))

    @contextlib.contextmanager
    def unet_context(self, batch: MethodBatch) -> Iterator[None]:
        features = self.features.get([r.path for r in batch.records])
        empty = self.features.empty()
        features = torch.stack([empty if d.image else f for d, f in zip(self.drops(batch), features)])
        tokens = self.image_tokens(features)
        self.unit.tokens = tokens
        try:
            yield
        finally:
            if tokens.requires_grad:
                # Gradient checkpointing replays the UNet's blocks during backward, after this context: the tokens
                # must still be there then. Their gradient is complete only after the last replay, so drop them then.
                # The hook lives in autograd's C++ graph, out of the collector's sight: holding the tokens or this
                # method strongly there made a cycle that kept every run (model, encoder, features) alive.
                unit, held = weakref.ref(self.unit), weakref.ref(tokens)
                tokens.register_hook(lambda grad: _drop_tokens(unit(), held()))
            else:
                _drop_tokens(self.unit, tokens)

    def nonfinite_inputs(self, batch: MethodBatch, updated: bool, root: Path | None) -> list[NonFiniteInput]:
        """This batch's CLIP image features (or face embeddings) and image tokens, recomputed (only after a
        non-finite loss)."""
        images = [r.path for r in batch.records]
        with torch.no_grad():
            features = self.features.get(images)
            rows = bad_rows(features)
            if rows:
                files = unique(images[r] for r in rows)
                named = ", ".join(shown(f, root) for f in files)
                if self.encoder is None:
                    return [NonFiniteInput(
                        InputSource.FEATURES, f"the face embeddings of {named} (pack {self.config.face_pack}) are "
                        f"{kind([features])}", "The face models give NaN/inf for that image: check the pack's files "
                        "(ip_face_pack) and the image; the learning rate is not the cause.", files)]
                return [NonFiniteInput(
                    InputSource.FEATURES, f"the CLIP image features of {named} (encoder {self.encoder.name}) are "
                    f"{kind([features])}", "The CLIP vision encoder gives NaN/inf for that image: check the encoder "
                    "file (ip_image_encoder) and the image; the learning rate is not the cause.", files)]
            empty = self.features.empty()
            features = torch.stack([empty if d.image else f for d, f in zip(self.drops(batch), features)])
            tokens = self.image_tokens(features)
        rows = bad_rows(tokens)
        if not rows:
            return []
        files = unique(images[r] for r in rows)
        advice = weights_advice(self.model.parameters(), updated, self.config.init_from, "ip_init_from",
                                "the IP-Adapter")
        return [NonFiniteInput(InputSource.FEATURES, f"the IP-Adapter's image tokens of "
                               f"{', '.join(shown(f, root) for f in files)} are {kind([tokens])}", advice, files)]

    def sample_conditioning(self, records: list[ImageRecord], image: Path | None,
                            resolution: int) -> "IPSampleConditioning":
        """Tokens of one reference image for the cond rows and of "no image" for the uncond rows, as the panel
        (and the reference's pipeline) give them."""
        path = Path(image) if image is not None else records[0].path
        with torch.no_grad():
            features = torch.stack([self.features.get([path])[0], self.features.empty()])
            tokens = self.image_tokens(features).detach()
        return IPSampleConditioning(f"reference {path.name}", self, tokens[:1], tokens[1:])

    @contextlib.contextmanager
    def tokens_active(self, tokens: torch.Tensor) -> Iterator[None]:
        """Run the UNet with given tokens (evaluation and tests)."""
        self.unit.tokens = tokens
        try:
            yield
        finally:
            self.unit.tokens = None

    # -- weights --------------------------------------------------------------------------------------
    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": learning_rate}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_strict(self.model, state, "IP-Adapter training state")

    def export(self, path: Path, info: ExportInfo, dtype: torch.dtype | None = None) -> Path:
        dtype = dtype or info.config.save_precision.dtype
        tensors = {k: v.to(dtype).contiguous() for k, v in self.trainable_state().items()}
        metadata = self._metadata(info)
        return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def _metadata(self, info: ExportInfo) -> dict[str, str]:
        c, p = info.config, self.projection
        settings = {"learning_rate": c.learning_rate, "batch_size": c.batch_size, "resolution": c.resolution,
                    "drops": [self.config.image_drop, self.config.text_drop, self.config.both_drop]}
        if self.encoder is None:  # FaceID: the face models' pack and the LoRA instead of a CLIP encoder
            reads = {"face_models": self.config.face_pack, "face_embedding": "normed", "ip_lora_rank":
                     str(self.config.lora_rank)}
        else:
            reads = {"clip_vision_encoder": self.encoder.name, "clip_vision_width": str(p.clip_dim),
                     "clip_vision_input": "hidden_states[-2]" if p.kind.uses_hidden_states else "image_embeds"}
        return {"format": "pt", "adapter_family": "ip-adapter", "ip_projection": self.config.projection.value,
                "ip_num_tokens": str(p.num_tokens), **reads, "base_model": info.model.name,
                "base_model_version": info.model.base_model_version, "output_name": c.output_name,
                "steps": str(info.step), "num_images": str(info.num_images), "fine_tuned_from": self.init_name,
                "training_settings": json.dumps(settings), "training_started_at": str(info.started_at),
                "training_finished_at": str(time.time()), "session_id": info.session_id}

    def load_trainable_file(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise FormatError(f"{path} is not a readable IP-Adapter file ({type(exc).__name__}: {exc})") from exc
        load_strict(self.model, state, str(path))

    def close(self) -> None:
        self.binding.restore()
        if self.lora_hooks is not None:
            self.lora_hooks.detach()
        if self.encoder is not None:
            self.encoder.model.to("cpu")
        else:
            self.features.release()


class IPSampleConditioning:
    def __init__(self, description: str, method: IPAdapterMethod, image: torch.Tensor, no_image: torch.Tensor):
        self.description, self.method, self.image, self.no_image = description, method, image, no_image

    @contextlib.contextmanager
    def around(self, uncond: bool, rows: int) -> Iterator[None]:
        tokens = self.no_image if uncond else self.image
        with self.method.tokens_active(tokens.expand(rows, *tokens.shape[1:])):
            yield


def _drop_tokens(unit: TrainingIPUnit | None, tokens: torch.Tensor | None) -> None:
    """Take a step's image tokens off the unit, unless a later step's are there already."""
    if unit is not None and tokens is not None and unit.tokens is tokens:
        unit.tokens = None

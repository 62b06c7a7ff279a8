"""The model files a run is told to read (``t2i_init_from``, ``ip_init_from``, ``ip_image_encoder``), checked before
it starts: readable, and of the family the field needs. Otherwise a request was accepted and the job failed
minutes later, in its thread.

The adapter files are read with the panel's own loaders (``formats``), which name the family a wrong file is;
the CLIP vision encoder (gigabytes) only by its header: its tensor names and shapes must be those of a vision
tower the encoder loader can build. Every message names the field, the file and what it holds instead. The
methods load their start files through ``load_t2i_start``/``load_ip_start``/``load_faceid_start``, so the rules are
the same there.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AdapterError, FormatError, InputError, MissingFileError
from ..formats.clip_vision import encoder_shape
from ..formats.detect import ModelFamily, detect_family
from ..formats.faceid import LoadedFaceIDAdapter, faceid_from_state_dict
from ..formats.ip import LoadedIPAdapter, ip_from_state_dict
from ..formats.reader import SAFETENSORS_SUFFIXES, read_safetensors_shapes, read_state_dict, read_weights
from ..formats.t2i import LoadedT2IAdapter, load_t2i_adapter
from ..models.faceid import FaceIDVariant
from ..models.t2i_adapter import SpatialAdapterConfig
from .config import IPAdapterConfig, IPProjection, Method, T2IConfig, TrainConfig

def _named(field: str, path: Path, load):
    """``load(path)``, with any problem as an error naming the field and the file."""
    if not Path(path).is_file():
        raise MissingFileError(f"{field}: {path} does not exist; give an existing file, or leave it empty")
    try:
        return load(path)
    except AdapterError as exc:
        message = f"{field}: {path} cannot be used: {exc}"
        try:
            renamed = type(exc)(message)
        except TypeError:  # an error type with its own constructor
            renamed = FormatError(message)
        raise renamed from None


def load_t2i_start(t2i: T2IConfig) -> LoadedT2IAdapter:
    """The T2I-Adapter ``t2i.init_from`` names, which must be a full or light one (style adapters are not trained)."""
    loaded = _named("t2i_init_from", t2i.init_from, load_t2i_adapter)
    if not isinstance(loaded.config, SpatialAdapterConfig):
        raise InputError(f"t2i_init_from: {t2i.init_from} holds a style T2I-Adapter; only full and light T2I-Adapters "
                         "can be trained. Choose one of those, or leave it empty to start from scratch")
    return loaded


def _load_ip_family(path: Path) -> LoadedIPAdapter | LoadedFaceIDAdapter:
    """An IP-Adapter or FaceID file, each by its own loader (the family from the keys); other files are refused
    naming what they are."""
    path = Path(path)
    sd = read_weights(path)
    if detect_family(sd, path.name)[0] is ModelFamily.IP_FACEID:
        return faceid_from_state_dict(sd, path.stem)
    return ip_from_state_dict(sd, path.stem)


def load_ip_start(ip: IPAdapterConfig) -> LoadedIPAdapter:
    """The IP-Adapter ``ip.init_from`` names, of the run's projection (plain = base, plus = plus)."""
    start = _named("ip_init_from", ip.init_from, _load_ip_family)
    if isinstance(start, LoadedFaceIDAdapter):
        raise InputError(f"ip_init_from: {ip.init_from} holds an IP-Adapter {start.variant.value}, which reads a face "
                         f"embedding, but ip_projection is {ip.projection.value}; to fine-tune a FaceID file choose "
                         "ip_projection faceid, or start from scratch")
    if start.variant is IPProjection.FULL_FACE:
        raise InputError(f"ip_init_from: {ip.init_from} holds a full-face IP-Adapter; training supports plain and "
                         "plus adapters only. Fine-tune a plain or plus file, or start from scratch")
    if start.variant is not ip.projection:
        raise InputError(f"ip_init_from: {ip.init_from} holds a {start.variant.value} IP-Adapter but ip_projection is "
                         f"{ip.projection.value}; to fine-tune it choose that projection (plain = base, plus = plus), "
                         "or start from scratch")
    return start


def load_faceid_start(ip: IPAdapterConfig) -> LoadedFaceIDAdapter:
    """The FaceID file ``ip.init_from`` names: a plain FaceID one (not Portrait or Plus) whose attention LoRA has the
    run's rank (a LoRA cannot change rank while it is trained)."""
    start = _named("ip_init_from", ip.init_from, _load_ip_family)
    if isinstance(start, LoadedIPAdapter):
        kind = start.variant.value
        other = f"; to fine-tune it choose ip_projection {kind}" if start.variant is not IPProjection.FULL_FACE else ""
        raise InputError(f"ip_init_from: {ip.init_from} holds a {kind} IP-Adapter, which reads CLIP image features, "
                         f"but ip_projection is faceid: fine-tune a FaceID file, or start from scratch{other}")
    if start.variant is not FaceIDVariant.FACEID:
        raise InputError(f"ip_init_from: {ip.init_from} holds a {start.variant.value} adapter; FaceID training trains "
                         "plain FaceID only. Fine-tune a FaceID file (ip-adapter-faceid_sd15 or _sdxl), or start from "
                         "scratch")
    found = next(iter(start.lora.values())).rank if start.lora else 0
    if found != ip.lora_rank:
        has = f"an attention LoRA of rank {found}" if found else "no attention LoRA"
        raise InputError(f"ip_init_from: {ip.init_from} holds {has} but ip_lora_rank is {ip.lora_rank}; set "
                         f"ip_lora_rank to {found} to fine-tune it, or start from scratch")
    return start


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weight file: a safetensors file by its header (checked complete), else by loading it."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt"):  # validates the header against the file's size (truncation)
            pass
    except Exception as exc:  # safetensors raises its own error types
        raise FormatError(f"it is not a readable safetensors file ({exc}); it is damaged or incomplete, often an "
                          "interrupted download: download it again") from None
    return read_safetensors_shapes(path)


def check_encoder_file(path: Path) -> None:
    """A CLIP vision encoder in the transformers layout, judged by its header (no weights are read)."""
    def check(p: Path) -> None:
        shapes = _header_shapes(p)
        try:
            encoder_shape({k: torch.empty(s, device="meta") for k, s in shapes.items()}, p.name)
        except FormatError:
            try:
                holds = f"a {detect_family({k: None for k in shapes}, p.name)[0].value} file"
            except FormatError:
                holds = f"no CLIP vision weights (first keys: {', '.join(sorted(shapes)[:3]) or 'none'})"
            raise FormatError(f"it holds {holds}, not a CLIP vision encoder. Use the image_encoder that comes with "
                              "IP-Adapter (model.safetensors), or leave it empty for the one the released adapters "
                              "use") from None

    _named("ip_image_encoder", path, check)


def check_named_files(config: TrainConfig) -> None:
    """Every model file the run will read, before it starts (``AdapterError`` naming the field, the file and what
    it holds)."""
    if config.method is Method.T2I_ADAPTER and config.t2i.init_from is not None:
        load_t2i_start(config.t2i)
    if config.method is Method.IP_ADAPTER:
        if config.ip.init_from is not None:
            (load_faceid_start if config.ip.faceid else load_ip_start)(config.ip)
        if config.ip.image_encoder is not None and not config.ip.faceid:  # FaceID reads no CLIP features
            check_encoder_file(config.ip.image_encoder)

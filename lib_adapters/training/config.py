"""Frozen, validated settings of one training run (``TrainConfig``) and of its methods (``LoraConfig``,
``T2IConfig``, ``IPAdapterConfig``): THE schema of a run.

Every field carries a ``Knob`` (``knob()``: label, range, which method owns it, its name in a request) from
which the rest is made: the flat request the tab and the web API send and the command line's ``--config`` reads
(``request.py``), the command line's flags (``cli_args.py``), the tab's widgets (``webui/training/knobs.py``) and
the API's OpenAPI model. Defaults are the ones the tab shows. Fields marked ``place`` say where things are (the
output folder, the folders of encoders and annotator weights): a front end fills them, a request never names them.

Enum fields also accept their string values ("cosine", "bf16", ...) so that a UI or a command line can pass what
the user picked; anything out of range raises ``SettingError`` (an ``InputError``) naming the field, the value and
the allowed range.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import typing
import unicodedata
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..face.discovery import DEFAULT_PACK
from ..formats.detect import T2ILayout
from ..models.ip_adapter import IPProjection
from ..models.t2i_adapter import T2IKind


class Method(str, Enum):
    LORA = "lora"
    T2I_ADAPTER = "t2i_adapter"
    IP_ADAPTER = "ip_adapter"


class LRSchedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class OptimizerKind(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"


class Precision(str, Enum):
    AUTO = "auto"  # training only: bf16 on a CUDA GPU (fp16 where it has no bf16), fp32 elsewhere
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        """The tensors' dtype (the one precision -> dtype table)."""
        if self is Precision.AUTO:
            raise ValueError("resolve() the automatic precision for a device first")
        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]

    def resolve(self, device: torch.device | str) -> "Precision":
        """AUTO made concrete for ``device``; any other precision as it is."""
        if self is not Precision.AUTO:
            return self
        if torch.device(device).type != "cuda":
            return Precision.FP32
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16


class LoraTargets(str, Enum):
    """Which UNet layers get LoRA. Each level includes the previous one."""

    ATTENTION = "attention"  # attn1/attn2 to_q, to_k, to_v, to_out.0
    ATTENTION_FF = "attention+ff"  # + proj_in/proj_out and ff.net.0.proj/ff.net.2: kohya's default set
    ATTENTION_FF_CONV = "attention+ff+conv"  # + ResBlock convs/emb/skip and down/upsample convs (kohya "LoCon")

    @property
    def feed_forward(self) -> bool:
        return self is not LoraTargets.ATTENTION

    @property
    def conv(self) -> bool:
        return self is LoraTargets.ATTENTION_FF_CONV


class TimestepSampling(str, Enum):
    UNIFORM = "uniform"
    CUBIC = "cubic"  # t = (1 - u**3) * T: more high-noise steps, where structure is decided (the SDXL recipe)


SAVED_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)


@dataclass(frozen=True)
class Knob:
    """What a config field is to the front ends (``dataclasses.field`` metadata, made by ``knob()``)."""

    label: str = ""  # as the tab shows it and --help describes it
    help: str = ""  # a short note for --help and the API docs
    low: float | None = None  # numbers: the allowed range (both ends included)
    high: float | None = None
    choices: tuple = ()  # enums: the allowed values when not every member is
    none: str = ""  # optional values: what "none" (null, empty, 0 in the tab) means
    name: str = ""  # the request/JSON/flag name when it is not the part's prefix + the field's name
    place: bool = False  # where things are (folders): given by the front end, never by a request
    tab: bool = True  # the Train Adapter tab has a widget for it (else the tab sends the default)
    file: str = ""  # "adapter" or "encoder": a file given by path or by the name the panel lists
    aliases: tuple[str, ...] = ()  # earlier command-line spellings that are still accepted


def knob(default: Any = MISSING, *, factory: Any = MISSING, **meta: Any) -> Any:
    """A dataclass field with its ``Knob``."""
    return field(default=default, default_factory=factory, metadata={"knob": Knob(**meta)})


def knob_of(f) -> Knob:
    return f.metadata.get("knob", Knob())


class SettingError(InputError):
    """A setting out of range; ``field`` names the config field at fault (None: a combination of them)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def choice(enum_type: type[Enum], value: Any, name: str, allowed: tuple = ()) -> Any:
    """``value`` (a member, or its string value in any case) as a member of ``enum_type`` among ``allowed`` (default:
    every member); ``SettingError`` naming ``name`` and the allowed values otherwise."""
    allowed = tuple(allowed) or tuple(enum_type)
    try:
        member = value if isinstance(value, enum_type) else enum_type(str(value).lower())
    except ValueError:
        member = None
    if member not in allowed:
        raise SettingError(f"{name} must be one of {', '.join(e.value for e in allowed)}; got {value!r}", name)
    return member


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """A config class's field types (its annotations resolved)."""
    return typing.get_type_hints(cls)


def _coerce_enums(obj) -> None:
    """Turn enum-typed fields given as strings into their enum (``SettingError`` on unknown values)."""
    hints = field_types(type(obj))
    for f in fields(obj):
        enum_type = hints[f.name]
        if isinstance(enum_type, type) and issubclass(enum_type, Enum):
            object.__setattr__(obj, f.name, choice(enum_type, getattr(obj, f.name), f.name, knob_of(f).choices))


def _to_paths(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) is not None:
            object.__setattr__(obj, name, Path(getattr(obj, name)))


MAX_OUTPUT_NAME = 120  # characters: the name becomes <name>.safetensors, <name>-checkpoints/<name>-step....state


def _shown_name(name) -> str:
    """A refused output name as a message shows it: escaped (no control characters reach a log) and shortened."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(name)} characters)"


def _check(ok: bool, message: str, name: str | None = None) -> None:
    if not ok:
        raise SettingError(message, name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int_ranges(obj, *names: str) -> None:
    """Each named int field (None allowed where its type is optional) within its knob's range."""
    hints = field_types(type(obj))
    for f in fields(obj):
        if f.name not in names:
            continue
        value, k = getattr(obj, f.name), knob_of(f)
        optional = value is None and type(None) in typing.get_args(hints[f.name])
        _check(optional or (_is_int(value) and k.low <= value <= k.high),
               f"{f.name} must be an integer in {k.low}..{k.high}" + (" or empty" if type(None) in
               typing.get_args(hints[f.name]) else "") + f"; got {value!r}", f.name)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = knob(16, label="LoRA rank", low=1, high=1024, name="rank", aliases=("--lora-rank",))
    # scale = alpha / rank, as kohya and the WebUI's Lora extension compute it
    alpha: float = knob(16.0, label="LoRA alpha", help="the update is scaled by alpha / rank", name="alpha",
                        aliases=("--lora-alpha",))
    targets: LoraTargets = knob(LoraTargets.ATTENTION, label="LoRA layers", name="lora_targets")
    train_text_encoder: bool = knob(False, label="Train the text encoder too", name="train_text_encoder",
                                    aliases=("--lora-train-text-encoder",))
    text_encoder_lr: float | None = knob(None, label="Text encoder learning rate", none="the run's learning rate",
                                         name="text_encoder_lr", tab=False, aliases=("--lora-text-encoder-lr",))

    def __post_init__(self):
        _coerce_enums(self)
        _check(_is_int(self.rank) and 1 <= self.rank <= 1024,
               f"LoRA rank must be an integer in 1..1024; got {self.rank!r}", "rank")
        _check(_is_num(self.alpha) and 0 < self.alpha <= 4096,
               f"LoRA alpha must be a number in (0, 4096]; got {self.alpha!r}", "alpha")
        _check(self.text_encoder_lr is None or (_is_num(self.text_encoder_lr) and 0 < self.text_encoder_lr <= 1),
               f"text encoder learning rate must be in (0, 1] or empty; got {self.text_encoder_lr!r}",
               "text_encoder_lr")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


@dataclass(frozen=True)
class IPAdapterConfig:
    """IP-Adapter training (the reference's tutorial_train.py / _plus.py / _faceid.py recipes)."""

    # full-face IP-Adapters are loaded by the panel, not trained
    projection: IPProjection = knob(IPProjection.PLAIN, label="Projection (plus: Resampler, 16 tokens; faceid: faces)",
                                    choices=(IPProjection.PLAIN, IPProjection.PLUS, IPProjection.FACEID),
                                    help="faceid: FaceID from each image's face embedding (insightface's models)")
    image_encoder: Path | None = knob(None, label="CLIP image encoder", file="encoder",
                                      none="the released adapters' one, found in the encoder folders")
    encoder_folders: tuple[Path, ...] = knob((), place=True)  # e.g. the WebUI's models/clip_vision
    init_from: Path | None = knob(None, label="Start from (an IP-Adapter to fine-tune)", file="adapter",
                                  none="from scratch")
    # the reference's dropout: the share of samples trained without the image (zeroed embeds, the reference's
    # uncond), without the caption, without both
    image_drop: float = knob(0.05, label="Drop rate: image")
    text_drop: float = knob(0.05, label="Drop rate: text")
    both_drop: float = knob(0.05, label="Drop rate: both")
    cache_features: bool = knob(True, label="Cache CLIP image features")  # in TrainConfig.cache_dir / "clip-features"
    resampler_dim: int | None = knob(None, label="Resampler width (plus)", low=8, high=8192, none="auto",
                                     help="auto: 1280 on SDXL, else the context width")
    resampler_depth: int = knob(4, label="Resampler depth (plus)", low=1, high=16)
    data_root: Path | None = knob(None, label="Images of a JSON list", none="the JSON file's folder")
    # FaceID: the face embedding of each image (insightface's detector and recognizer, run on onnxruntime; cached in
    # TrainConfig.cache_dir / "face-embeddings") in place of CLIP features, and the reference's attention LoRA
    face_pack: str = knob(DEFAULT_PACK, label="Face models (FaceID)",
                          help="insightface's model pack: a folder in models/insightface/models (buffalo_l, "
                               "antelopev2)")
    face_models: Path | None = knob(None, place=True)  # the packs' folder, e.g. the WebUI's models/insightface/models
    lora_rank: int = knob(128, label="Attention LoRA rank (FaceID; 0: none)", low=0, high=1024,
                          help="FaceID trains a LoRA on every attention's q/k/v/out with the adapter, as the reference "
                               "(rank 128); 0 trains without it")

    def __post_init__(self):
        _to_paths(self, "image_encoder", "init_from", "data_root", "face_models")
        object.__setattr__(self, "encoder_folders", tuple(Path(f) for f in self.encoder_folders))
        _coerce_enums(self)
        drops = (self.image_drop, self.text_drop, self.both_drop)
        _check(all(_is_num(d) and 0 <= d <= 1 for d in drops) and sum(drops) <= 1,
               f"image/text/both drop rates must be in [0, 1] and sum to at most 1 (0.05 each is the reference); "
               f"got {drops}")
        _check_int_ranges(self, "resampler_dim", "resampler_depth", "lora_rank")
        _check(isinstance(self.face_pack, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", self.face_pack)
               is not None, f"the face model pack is a folder name in models/insightface/models (buffalo_l, "
               f"antelopev2): letters, digits, _ . or -; got {self.face_pack!r}", "face_pack")

    @property
    def faceid(self) -> bool:
        """FaceID: face embeddings instead of CLIP features (and the attention LoRA when ``lora_rank``)."""
        return self.projection is IPProjection.FACEID


@dataclass(frozen=True)
class T2IConfig:
    """The T2I-Adapter method. Feature widths always follow the UNet (320/640/1280/1280 for SD and SDXL)."""

    adapter_kind: T2IKind = knob(T2IKind.FULL, label="Adapter")
    condition: str = knob("depth", label="Condition name (x.<condition>.png)")  # ``x.<condition>.png`` beside ``x.png``
    # 3 for RGB-like maps (depth, seg, openpose, colour), 1 for edges/sketches
    condition_channels: int = knob(3, label="Condition channels (1: edges, sketches)")
    num_res_blocks: int | None = knob(None, label="Blocks per level", low=1, high=8,
                                      none="as released, 2 full / 4 light")
    # makes missing conditions (kept in TrainConfig.cache_dir); "" or "none": every condition must exist
    preprocessor: str | None = knob(None, label="Preprocessor for missing conditions",
                                    none="every condition must exist")
    preprocessor_weights_dir: Path | None = knob(None, place=True)  # the annotator weights folder
    init_from: Path | None = knob(None, label="Start from (an adapter to fine-tune)", file="adapter",
                                  none="from scratch")
    timesteps: TimestepSampling = knob(TimestepSampling.UNIFORM, label="Timesteps (cubic: the SDXL recipe)")
    export_layout: T2ILayout = knob(T2ILayout.TENCENTARC, label="File layout")

    def __post_init__(self):
        _to_paths(self, "preprocessor_weights_dir", "init_from")
        if isinstance(self.preprocessor, str) and self.preprocessor.strip().lower() in ("", "none"):
            object.__setattr__(self, "preprocessor", None)  # the panel's "none" would copy each image as its condition
        _coerce_enums(self)
        _check(isinstance(self.condition, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.condition) is not None,
               f"the condition name is used in file names (x.<condition>.png): letters, digits, _ or -; "
               f"got {self.condition!r}", "condition")
        _check(_is_int(self.condition_channels) and self.condition_channels in (1, 3),
               f"condition channels must be 1 (edges, sketches) or 3 (RGB maps); got {self.condition_channels!r}",
               "condition_channels")
        _check_int_ranges(self, "num_res_blocks")
        _check(self.preprocessor is None or isinstance(self.preprocessor, str),
               f"preprocessor must be a name or empty; got {self.preprocessor!r}", "preprocessor")

    @property
    def res_blocks(self) -> int:
        if self.num_res_blocks is not None:
            return self.num_res_blocks
        return 4 if self.adapter_kind is T2IKind.LIGHT else 2


@dataclass(frozen=True)
class TrainConfig:
    dataset_dir: Path = knob(label="Dataset", aliases=("--dataset",),
                             help="a folder of images with captions; T2I: or a meta .txt; IP: or a JSON list")
    output_dir: Path = knob(place=True)
    output_name: str = knob(label="Output name", aliases=("--name",))
    method: Method = knob(Method.LORA, label="Method")
    resolution: int = knob(512, label="Resolution", low=64, high=4096, help="a multiple of 64; 1024 suits SDXL")
    steps: int = knob(1000, label="Steps", low=1, high=10_000_000, help="optimizer steps")
    batch_size: int = knob(1, label="Batch size", low=1, high=1024)
    grad_accumulation: int = knob(1, label="Gradient accumulation", low=1, high=1024)
    learning_rate: float = knob(1e-4, label="Learning rate")
    lr_schedule: LRSchedule = knob(LRSchedule.CONSTANT, label="LR schedule")
    warmup_steps: int = knob(0, label="Warmup steps", low=0, high=10_000_000)
    optimizer: OptimizerKind = knob(OptimizerKind.ADAMW, label="Optimizer")
    weight_decay: float = knob(1e-2, label="Weight decay", tab=False)
    max_grad_norm: float | None = knob(1.0, label="Gradient clipping norm", none="no clipping", tab=False)
    precision: Precision = knob(Precision.AUTO, label="Precision",
                                help="mixed precision; auto: bf16 on a GPU (fp16 where it has no bf16), fp32 on CPU")
    seed: int = knob(0, label="Seed")
    save_every: int = knob(500, label="Save every N steps (0: at the end)", low=0, high=10_000_000)
    sample_every: int = knob(0, label="Sample every N steps (0: off)", low=0, high=10_000_000)
    sample_prompts: tuple[str, ...] = knob((), label="Sample prompts")
    sample_seed: int | None = knob(None, label="Seed of the samples", none="the run's seed", tab=False)
    sample_steps: int = knob(20, label="Sampling steps of samples", low=1, high=1000)
    # T2I-Adapter: the samples' condition image (used as is); IP-Adapter: their reference image.
    # None: the dataset's first sample's condition or image. LoRA samples take none.
    sample_image: Path | None = knob(None, label="Sample image", none="the dataset's first")
    min_snr_gamma: float | None = knob(None, label="Min-SNR gamma", none="off, 5 usual", help="5 is the paper's value")
    noise_offset: float = knob(0.0, label="Noise offset")
    gradient_checkpointing: bool = knob(False, label="Gradient checkpointing")
    buckets: bool = knob(True, label="Aspect-ratio buckets")
    cache_latents: bool = knob(False, label="Cache latents")
    save_precision: Precision = knob(Precision.FP16, label="Saved file precision", choices=SAVED_PRECISIONS,
                                     help="the published file's tensors (every method)")
    min_image_size: int = knob(64, label="Smallest image side", low=1, high=8192, tab=False,
                               help="images whose shorter side is smaller are reported by validation")
    lora: LoraConfig = knob(factory=LoraConfig)
    t2i: T2IConfig = knob(factory=T2IConfig)
    ip: IPAdapterConfig = knob(factory=IPAdapterConfig)

    def __post_init__(self):
        object.__setattr__(self, "dataset_dir", Path(self.dataset_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        _to_paths(self, "sample_image")
        _coerce_enums(self)
        name = self.output_name
        _check(isinstance(name, str) and name.strip() == name and name not in ("", ".", "..")
               and not any(c in name for c in '/\\:*?"<>|')
               and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)
               and len(name) <= MAX_OUTPUT_NAME,
               f"output name must be a plain file name of at most {MAX_OUTPUT_NAME} characters, without a folder, "
               f"control characters or any of /\\:*?\"<>|; got {_shown_name(name)}", "output_name")
        self._check_numbers()

    def _check_numbers(self) -> None:
        _check_int_ranges(self, "resolution", "steps", "batch_size", "grad_accumulation", "warmup_steps", "save_every",
                          "sample_every", "sample_steps", "min_image_size")
        _check(self.resolution % 64 == 0, f"resolution must be a multiple of 64; got {self.resolution}", "resolution")
        _check(self.warmup_steps <= self.steps,
               f"warmup_steps ({self.warmup_steps}) cannot exceed steps ({self.steps})", "warmup_steps")
        for name in ("seed", "sample_seed"):
            value = getattr(self, name)
            _check((name == "sample_seed" and value is None) or (_is_int(value) and 0 <= value < 2**63),
                   f"{name} must be a non-negative integer; got {value!r}", name)
        _check(_is_num(self.learning_rate) and 0 < self.learning_rate <= 1,
               f"learning_rate must be in (0, 1]; got {self.learning_rate!r}", "learning_rate")
        _check(_is_num(self.weight_decay) and 0 <= self.weight_decay <= 1,
               f"weight_decay must be in [0, 1]; got {self.weight_decay!r}", "weight_decay")
        _check(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
               f"max_grad_norm must be positive or empty; got {self.max_grad_norm!r}", "max_grad_norm")
        _check(self.min_snr_gamma is None or (_is_num(self.min_snr_gamma) and self.min_snr_gamma > 0),
               f"min_snr_gamma must be positive (5 is usual) or empty to turn it off; got {self.min_snr_gamma!r}",
               "min_snr_gamma")
        _check(_is_num(self.noise_offset) and 0 <= self.noise_offset <= 1,
               f"noise_offset must be in [0, 1] (0.05-0.1 is usual); got {self.noise_offset!r}", "noise_offset")
        _check(self.sample_every == 0 or len(self.sample_prompts) > 0,
               "sample_every is set but there are no sample prompts; add at least one prompt or set sample_every to 0",
               "sample_every")
        _check(all(isinstance(p, str) for p in self.sample_prompts), "sample prompts must be strings", "sample_prompts")
        _check(self.sample_image is None or self.method is not Method.LORA,
               "a sample image is the condition (T2I-Adapter) or reference (IP-Adapter) of the samples; LoRA samples "
               "take none, so leave it empty", "sample_image")

    @property
    def samples_seed(self) -> int:
        """The seed of the mid-run samples: ``sample_seed``, or the run's seed."""
        return self.seed if self.sample_seed is None else self.sample_seed

    @property
    def cache_dir(self) -> Path:
        """Everything the run derives from its dataset (generated T2I conditions, latents, CLIP features) goes here,
        under the output folder, one folder per dataset (its name and a hash of its absolute path): never into the
        dataset itself, which may be read-only, shared, or named by an API client."""
        dataset = self.dataset_dir.expanduser().resolve()
        digest = hashlib.sha256(str(dataset).encode("utf-8", "surrogateescape")).hexdigest()[:12]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.stem)[:40].strip("._") or "dataset"
        return self.output_dir / "cache" / f"{name}-{digest}"

"""Frozen, validated settings of one training run (``TrainConfig``) and of its methods (``LoraConfig``,
``T2IConfig``, ``IPAdapterConfig``).

Enum fields also accept their string values ("cosine", "bf16", ...) so that a UI or a command line
can pass what the user picked; anything out of range raises ``InputError`` naming the field, the
value and the allowed range.
"""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from ..errors import InputError
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
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


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


def _coerce_enums(obj) -> None:
    """Turn enum-typed fields given as strings into their enum (``InputError`` on values not allowed there)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        enum_type = _ENUM_FIELDS.get(f.name)
        if enum_type is None:
            continue
        allowed = ENUM_CHOICES.get(f.name, tuple(enum_type))
        try:
            member = value if isinstance(value, enum_type) else enum_type(str(value).lower())
        except ValueError:
            member = None
        if member not in allowed:
            raise InputError(f"{f.name} must be one of {', '.join(e.value for e in allowed)}; got {value!r}") from None
        object.__setattr__(obj, f.name, member)


MAX_OUTPUT_NAME = 120  # characters: the name becomes <name>.safetensors, <name>-checkpoints/<name>-step....state


def _shown_name(name) -> str:
    """A refused output name as a message shows it: escaped (no control characters reach a log) and shortened."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(name)} characters)"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0  # scale = alpha / rank, as kohya and the WebUI's Lora extension compute it
    targets: LoraTargets = LoraTargets.ATTENTION
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: the run's learning rate
    save_precision: Precision = Precision.FP16  # dtype of the tensors in the exported .safetensors

    def __post_init__(self):
        _coerce_enums(self)
        _check(_is_int(self.rank) and 1 <= self.rank <= 1024, f"LoRA rank must be an integer in 1..1024; got {self.rank!r}")
        _check(_is_num(self.alpha) and 0 < self.alpha <= 4096,
               f"LoRA alpha must be a number in (0, 4096]; got {self.alpha!r}")
        _check(self.text_encoder_lr is None or (_is_num(self.text_encoder_lr) and 0 < self.text_encoder_lr <= 1),
               f"text encoder learning rate must be in (0, 1] or empty; got {self.text_encoder_lr!r}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


@dataclass(frozen=True)
class IPAdapterConfig:
    """IP-Adapter training (the reference's tutorial_train.py / tutorial_train_plus.py recipe)."""

    projection: IPProjection = IPProjection.PLAIN
    image_encoder: Path | None = None  # CLIP vision file; None: the reference's one, found in encoder_folders
    encoder_folders: tuple[Path, ...] = ()  # e.g. the WebUI's models/clip_vision
    init_from: Path | None = None  # an IP-Adapter file to fine-tune; None: start from scratch
    image_drop: float = 0.05  # share of samples trained without the image (zeroed embeds, the reference's uncond)
    text_drop: float = 0.05  # ... with an empty caption
    both_drop: float = 0.05  # ... with neither
    cache_features: bool = True  # keep CLIP image features on disk (TrainConfig.cache_dir / "clip-features")
    resampler_dim: int | None = None  # plus only; None: 1280 for SDXL (the reference), else the context width
    resampler_depth: int = 4
    data_root: Path | None = None  # images of a JSON list dataset; None: the JSON file's folder
    save_precision: Precision = Precision.FP16

    def __post_init__(self):
        for name in ("image_encoder", "init_from", "data_root"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "encoder_folders", tuple(Path(f) for f in self.encoder_folders))
        _coerce_enums(self)
        drops = (self.image_drop, self.text_drop, self.both_drop)
        _check(all(_is_num(d) and 0 <= d <= 1 for d in drops) and sum(drops) <= 1,
               f"image/text/both drop rates must be in [0, 1] and sum to at most 1 (0.05 each is the reference); "
               f"got {drops}")
        _check(self.resampler_dim is None or (_is_int(self.resampler_dim) and 8 <= self.resampler_dim <= 8192),
               f"resampler_dim must be an integer in 8..8192 or empty; got {self.resampler_dim!r}")
        _check(_is_int(self.resampler_depth) and 1 <= self.resampler_depth <= 16,
               f"resampler_depth must be an integer in 1..16; got {self.resampler_depth!r}")


@dataclass(frozen=True)
class T2IConfig:
    """The T2I-Adapter method. Feature widths always follow the UNet (320/640/1280/1280 for SD and SDXL)."""

    adapter_kind: T2IKind = T2IKind.FULL
    condition: str = "depth"  # the condition's name: ``x.<condition>.png`` beside ``x.png``
    condition_channels: int = 3  # 3 for RGB-like maps (depth, seg, openpose, colour), 1 for edges/sketches
    num_res_blocks: int | None = None  # per level; None: the released adapters' 2 (full) or 4 (light)
    preprocessor: str | None = None  # makes missing conditions (kept in TrainConfig.cache_dir); None: all must exist
    preprocessor_weights_dir: Path | None = None  # the annotator weights folder, for preprocessors that need one
    init_from: Path | None = None  # an adapter file to fine-tune; None: start from scratch
    timesteps: TimestepSampling = TimestepSampling.UNIFORM
    export_layout: T2ILayout = T2ILayout.TENCENTARC
    save_precision: Precision = Precision.FP16

    def __post_init__(self):
        for name in ("preprocessor_weights_dir", "init_from"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        _coerce_enums(self)
        _check(isinstance(self.condition, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.condition) is not None,
               f"the condition name is used in file names (x.<condition>.png): letters, digits, _ or -; "
               f"got {self.condition!r}")
        _check(_is_int(self.condition_channels) and self.condition_channels in (1, 3),
               f"condition channels must be 1 (edges, sketches) or 3 (RGB maps); got {self.condition_channels!r}")
        _check(self.num_res_blocks is None or (_is_int(self.num_res_blocks) and 1 <= self.num_res_blocks <= 8),
               f"blocks per level must be an integer in 1..8 or empty; got {self.num_res_blocks!r}")
        _check(self.preprocessor is None or (isinstance(self.preprocessor, str) and self.preprocessor.strip() != ""),
               f"preprocessor must be a name or empty; got {self.preprocessor!r}")

    @property
    def res_blocks(self) -> int:
        if self.num_res_blocks is not None:
            return self.num_res_blocks
        return 4 if self.adapter_kind is T2IKind.LIGHT else 2


@dataclass(frozen=True)
class TrainConfig:
    dataset_dir: Path
    output_dir: Path
    output_name: str
    method: Method = Method.LORA
    resolution: int = 512
    steps: int = 1000  # optimizer steps
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    precision: Precision = Precision.FP32
    seed: int = 0
    save_every: int = 0  # 0: save only at the end (and on interrupt)
    sample_every: int = 0  # 0: no samples
    sample_prompts: tuple[str, ...] = ()
    sample_seed: int = 0
    sample_steps: int = 20
    # T2I-Adapter: the samples' condition image (used as is); IP-Adapter: their reference image.
    # None: the dataset's first sample's condition or image. LoRA samples take none.
    sample_image: Path | None = None
    min_snr_gamma: float | None = None  # None: off; 5 is the paper's value
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    buckets: bool = True
    cache_latents: bool = False
    min_image_size: int = 64  # images whose shorter side is smaller are reported by validation
    lora: LoraConfig = field(default_factory=LoraConfig)
    t2i: T2IConfig = field(default_factory=T2IConfig)
    ip: IPAdapterConfig = field(default_factory=IPAdapterConfig)

    def __post_init__(self):
        object.__setattr__(self, "dataset_dir", Path(self.dataset_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if self.sample_image is not None:
            object.__setattr__(self, "sample_image", Path(self.sample_image))
        _coerce_enums(self)
        name = self.output_name
        _check(isinstance(name, str) and name.strip() == name and name not in ("", ".", "..")
               and not any(c in name for c in '/\\:*?"<>|')
               and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)
               and len(name) <= MAX_OUTPUT_NAME,
               f"output name must be a plain file name of at most {MAX_OUTPUT_NAME} characters, without a folder, "
               f"control characters or any of /\\:*?\"<>|; got {_shown_name(name)}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        ints = dict(resolution=(64, 4096), steps=(1, 10_000_000), batch_size=(1, 1024), grad_accumulation=(1, 1024),
                    warmup_steps=(0, 10_000_000), save_every=(0, 10_000_000), sample_every=(0, 10_000_000),
                    sample_steps=(1, 1000), min_image_size=(1, 8192))
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            _check(_is_int(value) and low <= value <= high, f"{name} must be an integer in {low}..{high}; got {value!r}")
        _check(self.resolution % 64 == 0, f"resolution must be a multiple of 64; got {self.resolution}")
        _check(self.warmup_steps <= self.steps, f"warmup_steps ({self.warmup_steps}) cannot exceed steps ({self.steps})")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be a non-negative integer; got {self.seed!r}")
        _check(_is_num(self.learning_rate) and 0 < self.learning_rate <= 1, f"learning_rate must be in (0, 1]; got {self.learning_rate!r}")
        _check(_is_num(self.weight_decay) and 0 <= self.weight_decay <= 1,
               f"weight_decay must be in [0, 1]; got {self.weight_decay!r}")
        _check(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
               f"max_grad_norm must be positive or empty; got {self.max_grad_norm!r}")
        _check(self.min_snr_gamma is None or (_is_num(self.min_snr_gamma) and self.min_snr_gamma > 0),
               f"min_snr_gamma must be positive (5 is usual) or empty to turn it off; got {self.min_snr_gamma!r}")
        _check(_is_num(self.noise_offset) and 0 <= self.noise_offset <= 1,
               f"noise_offset must be in [0, 1] (0.05-0.1 is usual); got {self.noise_offset!r}")
        _check(self.sample_every == 0 or len(self.sample_prompts) > 0,
               "sample_every is set but there are no sample prompts; add at least one prompt or set sample_every to 0")
        _check(all(isinstance(p, str) for p in self.sample_prompts), "sample prompts must be strings")
        _check(self.sample_image is None or self.method is not Method.LORA,
               "a sample image is the condition (T2I-Adapter) or reference (IP-Adapter) of the samples; LoRA samples "
               "take none, so leave it empty")

    @property
    def micro_batches(self) -> int:
        """Batches consumed by the whole run."""
        return self.steps * self.grad_accumulation

    @property
    def cache_dir(self) -> Path:
        """Everything the run derives from its dataset (generated T2I conditions, latents, CLIP features) goes here,
        under the output folder, one folder per dataset (its name and a hash of its absolute path): never into the
        dataset itself, which may be read-only, shared, or named by an API client."""
        dataset = self.dataset_dir.expanduser().resolve()
        digest = hashlib.sha256(str(dataset).encode("utf-8", "surrogateescape")).hexdigest()[:12]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.stem)[:40].strip("._") or "dataset"
        return self.output_dir / "cache" / f"{name}-{digest}"


# fields whose enum has members training does not make: full-face IP-Adapters are loaded, not trained
ENUM_CHOICES = {"projection": (IPProjection.PLAIN, IPProjection.PLUS)}
_ENUM_FIELDS = {"method": Method, "lr_schedule": LRSchedule, "optimizer": OptimizerKind, "precision": Precision,
                "targets": LoraTargets, "save_precision": Precision, "projection": IPProjection,
                "adapter_kind": T2IKind, "timesteps": TimestepSampling, "export_layout": T2ILayout}

"""T2I-Adapter networks in the TencentARC parameter layout.

Three families, each built from a small frozen config that ``formats.t2i`` reads off a file's
shapes (so tiny test models and the released 77M-parameter adapters share one code path):

- ``FullAdapter``: SD1.x/2.x (PixelUnshuffle 8, a halving before levels 1-3) and SDXL
  (PixelUnshuffle 16, one halving before level 2 only).
- ``LightAdapter``: the colour adapter (one small extractor per level, no ``conv_in``).
- ``StyleAdapter``: CLIP ViT-L tokens in, ``num_tokens`` context tokens out (appended to the text
  context rather than added to the UNet's features).

Downsampling uses ``AvgPool2d(2, ceil_mode=True)`` like diffusers, so odd sizes round up exactly as
the UNet's stride-2 convolutions do; on even sizes it equals TencentARC's floor pooling.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class T2IKind(str, Enum):
    """A spatial T2I-Adapter's network: THE name for it (files, training, the API's values). The style adapter
    is no kind of these: it has its own config and network (``StyleAdapterConfig``)."""

    FULL = "full"  # TencentARC ``Adapter`` / ``Adapter_XL`` (depth, sketch, canny, openpose, ...)
    LIGHT = "light"  # TencentARC ``Adapter_light`` (colour)


@dataclass(frozen=True)
class SpatialAdapterConfig:
    """Shape of a full or light adapter, as read from a state dict."""

    kind: T2IKind
    in_channels: int  # after PixelUnshuffle: image channels * unshuffle**2
    channels: tuple[int, ...]  # feature channels per level
    num_res_blocks: int
    unshuffle: int  # 8 for SD1/SD2 adapters, 16 for SDXL ones
    kernel_size: int = 1  # block2/in_conv kernel of full adapters (1 in released files)
    conv_downsample: bool = False  # TencentARC ``use_conv=True``: a strided conv instead of pooling
    sdxl: bool = False

    @property
    def image_channels(self) -> int:
        return self.in_channels // (self.unshuffle**2)

    def halves_before(self, level: int) -> bool:
        """Whether the adapter halves the resolution at the start of ``level``."""
        if self.sdxl:
            return level == 2
        return level > 0


@dataclass(frozen=True)
class StyleAdapterConfig:
    width: int = 1024
    context_dim: int = 768
    num_heads: int = 8
    num_layers: int = 3
    num_tokens: int = 8


class _Downsample(nn.Module):
    """Halving step; ``op`` only exists in the strided-conv variant (key ``down_opt.op.weight``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _ResnetBlock(nn.Module):
    """TencentARC ``ResnetBlock`` (sk=True): optional halving, optional in_conv, two convs, residual."""

    def __init__(self, cin: int, cout: int, down: bool, cfg: SpatialAdapterConfig):
        super().__init__()
        pad = cfg.kernel_size // 2
        self.down_opt = _Downsample(cin, cfg.conv_downsample) if down else None
        # Only the released ``sk=True`` form exists here: TencentARC's ``sk=False`` form cannot
        # run across a channel change and no published file uses it.
        self.in_conv = nn.Conv2d(cin, cout, cfg.kernel_size, 1, pad) if cin != cout else None
        self.block1 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(cout, cout, cfg.kernel_size, 1, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class FullAdapter(nn.Module):
    """Full T2I-Adapter (SD1.x/2.x and SDXL): keys ``conv_in.*`` and ``body.{n}.*``."""

    def __init__(self, cfg: SpatialAdapterConfig):
        super().__init__()
        self.config = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, 1, 1)
        blocks = []
        for level, cout in enumerate(cfg.channels):
            for j in range(cfg.num_res_blocks):
                cin = cfg.channels[level - 1] if (level > 0 and j == 0) else cout
                down = j == 0 and cfg.halves_before(level)
                blocks.append(_ResnetBlock(cin, cout, down, cfg))
        self.body = nn.ModuleList(blocks)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(self.unshuffle(image))
        features = []
        for level in range(len(self.config.channels)):
            for j in range(self.config.num_res_blocks):
                x = self.body[level * self.config.num_res_blocks + j](x)
            features.append(x)
        return features


class _LightResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class _LightExtractor(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool):
        super().__init__()
        inner = cout // 4
        self.down_opt = _Downsample(cin, use_conv=False) if down else None
        self.in_conv = nn.Conv2d(cin, inner, 1, 1, 0)
        self.body = nn.Sequential(*[_LightResBlock(inner) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(inner, cout, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class LightAdapter(nn.Module):
    """Light T2I-Adapter (colour): keys ``body.{i}.in_conv``, ``body.{i}.body.{j}.*``, ``out_conv``."""

    def __init__(self, cfg: SpatialAdapterConfig):
        super().__init__()
        self.config = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        cins = (cfg.in_channels,) + cfg.channels[:-1]
        self.body = nn.ModuleList(
            _LightExtractor(cin, cout, cfg.num_res_blocks, down=cfg.halves_before(level))
            for level, (cin, cout) in enumerate(zip(cins, cfg.channels))
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(image)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class _FP32LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = _FP32LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = _FP32LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    """Style T2I-Adapter: CLIP vision hidden states [N, L, width] -> [N, num_tokens, context_dim]."""

    def __init__(self, cfg: StyleAdapterConfig):
        super().__init__()
        self.config = cfg
        scale = cfg.width**-0.5
        self.style_embedding = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * scale)
        self.ln_pre = _FP32LayerNorm(cfg.width)
        # The original spells this attribute "layes"; it is part of the file's key names.
        self.transformer_layes = nn.Sequential(
            *[_ResidualAttentionBlock(cfg.width, cfg.num_heads) for _ in range(cfg.num_layers)]
        )
        self.ln_post = _FP32LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.context_dim))

    def forward(self, clip_hidden: torch.Tensor) -> torch.Tensor:
        style = self.style_embedding.expand(clip_hidden.shape[0], -1, -1).to(clip_hidden.dtype)
        x = self.ln_pre(torch.cat([clip_hidden, style], dim=1))
        x = self.transformer_layes(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, -self.config.num_tokens :, :]) @ self.proj


def build_adapter(cfg: SpatialAdapterConfig | StyleAdapterConfig) -> nn.Module:
    """The module for a config; weights are random until a state dict is loaded."""
    if isinstance(cfg, StyleAdapterConfig):
        return StyleAdapter(cfg)
    if cfg.kind is T2IKind.LIGHT:
        return LightAdapter(cfg)
    return FullAdapter(cfg)

"""The built-in tiny model as diffusers component configs, and its word-hash tokenizer: what the headless trainer
trains when no checkpoint is given (offline, seconds per step on a CPU; ``training.loading.load_tiny`` builds it).

The UNet has SD1.x's block structure at toy width (the diffusers twin of ``tiny.TINY_SD1``: 32/64/128/128
channels, two res blocks per level, cross-attention at the first three levels, 4 heads, context 32), so
a LoRA trained on it has SD1.x kohya names and maps onto the stub WebUI's tiny ldm model key for key.
Text: a random 2-layer ``CLIPTextModel`` (width 32) behind ``WordHashTokenizer``, a deterministic tokenizer
with the small HF-like surface the backends use (the stub WebUI model shares both). VAE: diffusers'
``AutoencoderKL``, 4 levels of 32 channels. Schedule: SD's scaled-linear betas, eps prediction.
"""
from __future__ import annotations

import re
import zlib

import torch
from torch import nn

VOCAB_SIZE = 1000
BOS_ID, EOS_ID = 998, 999
MAX_LENGTH = 77


class WordHashTokenizer:
    """A deterministic tokenizer with a small HF-like surface: words/punctuation -> crc32 -> 1..996."""

    bos_token_id, eos_token_id, pad_token_id = BOS_ID, EOS_ID, EOS_ID
    model_max_length = MAX_LENGTH

    def encode_words(self, text: str) -> list[int]:
        return [1 + zlib.crc32(w.encode("utf8")) % (BOS_ID - 2) for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())]

    def __call__(self, text, truncation: bool = False, max_length: int | None = None, padding=False,
                 add_special_tokens: bool = True, return_tensors: str | None = None, **_):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [[BOS_ID, *self.encode_words(t), EOS_ID] if add_special_tokens else self.encode_words(t) for t in texts]
        if truncation and max_length:
            ids = [x[: max_length - 1] + [EOS_ID] if add_special_tokens and len(x) > max_length else x[:max_length] for x in ids]
        if padding == "max_length" and max_length:
            ids = [x + [self.pad_token_id] * (max_length - len(x)) for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids)}
        return {"input_ids": ids if not isinstance(text, str) else ids[0]}


def tiny_clip_text_model(hidden: int, projection: int | None = None) -> nn.Module:
    """A random 2-layer transformers CLIP text encoder of width ``hidden`` (with a projection: the SDXL bigG-like one)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, pad_token_id=EOS_ID, projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    final_norm = model.text_model.final_layer_norm
    nn.init.normal_(final_norm.bias, std=0.1)  # a zero-mean output would make WebUI emphasis divide by 0
    return model.eval()


def tiny_unet_config() -> dict:
    """``UNet2DConditionModel`` kwargs of the tiny SD1-structured UNet (diffusers' ``attention_head_dim`` is the
    head count in SD1 configs)."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)


def tiny_vae_config() -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
                sample_size=64, scaling_factor=0.18215)


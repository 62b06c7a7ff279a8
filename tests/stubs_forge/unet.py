"""Fake of Forge's UNet forward (main ``backend/nn/unet.py``, Classic ``ldm_patched/ldm/modules/
diffusionmodules/openaimodel.py`` + ``attention.py``; the same order in both), run over the genuine ldm
modules of an sdkit ``UNetModel`` so the weights are the ones the A1111 path runs.

``unet_forward(unet, x, timesteps, context, y, control, transformer_options)`` writes ``original_shape``
and ``transformer_index`` into ``transformer_options`` and, per block, ``block`` (``("input", i)``,
``("middle", 0)``, ``("output", i)``, ``("last", 0)``); around each block it calls the block modifiers
(``modifier(h, 'before'|'after', transformer_options)``). Input blocks: block, ``apply_control`` (pops
``control['input']`` from the end, ``h += ctrl``), 'after' modifiers, ``input_block_patch``, the skip is
stored, ``input_block_patch_after_skip``. Middle: block, ``apply_control``, modifiers. Output blocks: skip
popped, ``apply_control`` on it, ``output_block_patch``, concat, modifiers around the block. Inside a
block every layer is bracketed by the block inner modifiers; each spatial transformer sets
``block_index`` per transformer block and bumps ``transformer_index`` after it.

A transformer block builds a fresh ``extra_options`` (every transformer option but the patch dicts, plus
``n_heads``/``dim_head``) shared by its patches, then: norm1, ``attn1_patch`` list, attn1 (replace slot
``(block, number, block_index)`` then ``(block, number)``, else the attention), ``attn1_output_patch``,
residual, ``middle_patch``; norm2, ``attn2_patch`` list (value starts as the context), attn2 replace slot or
the attention module, ``attn2_output_patch``, residual; feed-forward. The residuals are added in place
(``x += n``), as both Forges write them. The attention module is the ldm one
(the same arithmetic as on the A1111 path); a value that differs from the context, and the replace slots'
callers, use ``scaled_dot_product_attention`` over the module's projections.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.nn.functional as F

with contextlib.redirect_stdout(io.StringIO()):  # ldm prints about xformers on import
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import TimestepBlock, Upsample
    from ldm.modules.diffusionmodules.util import timestep_embedding


def apply_control(h: torch.Tensor, control: dict | None, name: str) -> torch.Tensor:
    if control is not None and control.get(name):
        ctrl = control[name].pop()
        if ctrl is not None:
            h += ctrl
    return h


def attention(attn: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
              value: torch.Tensor | None = None) -> torch.Tensor:
    """``attn.to_out(softmax(q k^T / sqrt(d)) v)`` with q from ``x``, k from ``context``, v from ``value``: the
    attention module itself when keys and values come from one tensor (as Forge calls ``self.attn2(...)``),
    else its projections with the attention function."""
    if value is None or value is context:
        return attn(x, context=context)
    context = x if context is None else context
    return attn.to_out(attention_heads(attn.to_q(x), attn.to_k(context), attn.to_v(value), attn.heads))


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected ``[rows, tokens, heads*dim]`` q, k, v -> the attention output in the same layout."""
    b = q.shape[0]
    split = [t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, q.shape[1], -1)


def _replace(slots: dict, block: Any, block_index: int):
    if block is None:
        return None
    return slots.get((block[0], block[1], block_index)) or slots.get((block[0], block[1]))


def _attend(attn: torch.nn.Module, name: str, n: torch.Tensor, context: torch.Tensor | None, to: dict,
            extra: dict) -> torch.Tensor:
    """One attention of a transformer block with its patch points: the ``<name>_patch`` list (the value starts
    as the context, which for attn1 starts as ``n``), the replace slot, else the module; ``<name>_output_patch``."""
    patches = to.get("patches", {})
    value = None
    if f"{name}_patch" in patches:
        context = n if context is None else context
        value = context
        for p in patches[f"{name}_patch"]:
            n, context, value = p(n, context, value, extra)
    where = to.get("block")
    fn = _replace(to.get("patches_replace", {}).get(name, {}), where, to.get("block_index", 0))
    if fn is not None:
        context = n if context is None else context
        value = context if value is None else value
        n = attn.to_out(fn(attn.to_q(n), attn.to_k(context), attn.to_v(value), extra))
    else:
        n = attention(attn, n, context, value)
    for p in patches.get(f"{name}_output_patch", []):
        n = p(n, extra)
    return n


def transformer_block(block: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, to: dict) -> torch.Tensor:
    extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
    extra["n_heads"] = block.attn1.heads
    extra["dim_head"] = block.attn1.to_q.out_features // block.attn1.heads
    # the residuals in place, as Forge writes them (`x += n` after norm1/norm2 saved x): autograd through them
    # fails unless the trainer makes them out of place (the real Forge main failed so at the first LoRA step)
    n = _attend(block.attn1, "attn1", block.norm1(x), context if block.disable_self_attn else None, to, extra)
    x += n
    for p in to.get("patches", {}).get("middle_patch", []):
        x = p(x, extra)
    n = _attend(block.attn2, "attn2", block.norm2(x), context, to, extra)
    x += n
    x_skip = x
    x = block.ff(block.norm3(x))
    x += x_skip
    return x


def spatial_transformer(st: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, to: dict) -> torch.Tensor:
    b, c, h, w = x.shape
    x_in = x
    x = st.norm(x)
    if not st.use_linear:
        x = st.proj_in(x)
    x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
    if st.use_linear:
        x = st.proj_in(x)
    for i, block in enumerate(st.transformer_blocks):
        to["block_index"] = i
        x = transformer_block(block, x, context, to)
    if st.use_linear:
        x = st.proj_out(x)
    x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    if not st.use_linear:
        x = st.proj_out(x)
    return x + x_in


def upsample(layer: torch.nn.Module, x: torch.Tensor, output_shape) -> torch.Tensor:
    size = tuple(output_shape[2:]) if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
    x = F.interpolate(x, size=size, mode="nearest")
    return layer.conv(x) if layer.use_conv else x


def forward_timestep_embed(seq: torch.nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                           to: dict, output_shape=None) -> torch.Tensor:
    """One UNet block: its layers in order, each between the block inner modifiers."""
    inner = to.get("block_inner_modifiers", [])
    for index, layer in enumerate(seq):
        for modifier in inner:
            x = modifier(x, "before", layer, index, seq, to)
        if isinstance(layer, TimestepBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = spatial_transformer(layer, x, context, to)
            if "transformer_index" in to:
                to["transformer_index"] += 1
        elif isinstance(layer, Upsample):
            x = upsample(layer, x, output_shape)
        else:
            x = layer(x)
        for modifier in inner:
            x = modifier(x, "after", layer, index, seq, to)
    return x


def unet_forward(unet: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, control: dict | None = None,
                 transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
    to = transformer_options if transformer_options is not None else {}
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    modifiers = to.get("block_modifiers", [])
    assert (y is not None) == (unet.num_classes is not None)

    def around(h: torch.Tensor, flag: str) -> torch.Tensor:
        for modifier in modifiers:
            h = modifier(h, flag, to)
        return h

    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    hs = []
    h = x.type(unet.dtype)
    for index, module in enumerate(unet.input_blocks):
        to["block"] = ("input", index)
        h = around(h, "before")
        h = forward_timestep_embed(module, h, emb, context, to)
        h = apply_control(h, control, "input")
        h = around(h, "after")
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)
    to["block"] = ("middle", 0)
    h = around(h, "before")
    h = forward_timestep_embed(unet.middle_block, h, emb, context, to)
    h = apply_control(h, control, "middle")
    h = around(h, "after")
    for index, module in enumerate(unet.output_blocks):
        to["block"] = ("output", index)
        hsp = apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", []):
            h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        output_shape = hs[-1].shape if hs else None
        h = around(h, "before")
        h = forward_timestep_embed(module, h, emb, context, to, output_shape)
        h = around(h, "after")
    to["block"] = ("last", 0)
    h = around(h.type(x.dtype), "before")
    h = unet.out(h)
    h = around(h, "after")
    return h.type(x.dtype)


class OperationsLinear(torch.nn.Module):
    """Forge main's ``backend.operations.ForgeOperations.Linear``: a plain ``nn.Module`` (not an ``nn.Linear``, so
    building it skips weight initialisation) with ``in_features``, ``out_features``, ``weight`` and ``bias``,
    computing ``F.linear`` (fp32 on CPU: no manual cast)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.parameters_manual_cast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def use_operations_linears(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Make ``unet``'s linear layers Forge main's (same parameters); returns what ``restore_linears`` puts back."""
    undo = []
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, OperationsLinear(child))
                undo.append((parent, name, child))
    return undo


def restore_linears(undo: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for parent, name, child in reversed(undo):
        setattr(parent, name, child)

"""A small re-implementation, written from reading the source (not copied), of how Mikubill/sd-webui-controlnet
decides what an adapter file is and which module shapes it loads it into.

Read at commit 56cec5b2958edf3b1807b7e7b2b1b5186dbd2f81 (2024-07-25):

- ``scripts/controlnet_model_guess.py`` ``build_model_by_guess``: the diffusers T2I layout
  (``adapter.body.{i}.resnets.{j}.`` -> ``body.{2i+j}.``, ``adapter.body.{i}.`` -> ``body.{2i}.``, then ``adapter.``
  dropped); a flat IP safetensors (some key holding ``image_proj.`` and some ``ip_adapter.``) split by prefix into
  ``{"image_proj": ..., "ip_adapter": ...}`` with the ``ip_adapter`` keys sorted by their leading integer; every key's
  ``control_model.`` and ``adapter.`` removed; then, in order: ``input_hint_block.0.weight`` -> ControlNet,
  ``conv_in.weight`` -> full T2I-Adapter (``cin``/channel from ``conv_in``'s shape, ``ksize`` from
  ``body.0.block2.weight``, ``use_conv`` when a ``down_opt.op.weight`` key exists, SDXL when ``cin`` is 256 or 768,
  ``nums_rb=2``, ``sk=True``, channels ``[c, 2c, 4c, 4c]``), ``style_embedding`` -> style adapter,
  ``body.0.in_conv.weight`` -> light adapter (fixed channels ``[320, 640, 1280, 1280]``, ``nums_rb=4``, ``cin`` from the
  key, PixelUnshuffle(8) only), ``ip_adapter`` -> IP-Adapter. Modules are loaded with ``strict=False`` for T2I
  (unused keys ignored, shape mismatches still fail) and strictly for the IP ``image_proj`` model.
- ``scripts/adapter.py``: ``Adapter``/``ResnetBlock`` and ``Adapter_light``/``extractor``/``ResnetBlock_light``
  parameter layout (re-derived below as key -> shape tables).
- ``scripts/ipadapter/ipadapter_model.py`` ``IPAdapterModel.load``: name tips ``"v2"``, ``"faceid"``, ``"instant_id"``,
  ``"portrait"`` (case-sensitive) and ``"pulid"`` (lower-cased) on the model name; full when ``proj.3.weight`` is in
  ``image_proj``; plus when full, ``latents`` or ``perceiver_resampler.proj_in.weight`` is; cross-attention width from
  ``ip_adapter["1.to_k_ip.weight"].shape[1]`` (so the numbering must hold ``1``), SDXL when that width is 2048; the
  plain token count is ``proj.weight.shape[0] // width``, plus/portrait use 16; the CLIP width from ``proj.weight``
  (plain), ``proj_in.weight`` (SD1 plus) or ``latents.shape[2]`` (SDXL plus); the Resampler is ``depth=4``,
  ``dim_head=64``, ``heads=12`` and ``dim=width`` for SD1 (``heads=20``, ``dim=1280`` for SDXL), ``ff_mult=4``.
  ``To_KV`` makes one bias-free Linear per ``ip_adapter`` key (no shape expectations of its own).
- ``scripts/ipadapter/image_proj_models.py``: ``ImageProjModel``, ``Resampler``/``PerceiverAttention``/``FeedForward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

COMMIT = "56cec5b2958edf3b1807b7e7b2b1b5186dbd2f81"


def _replace_prefixes(state_dict: dict, mapping: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for old, new in mapping.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def normalise(state_dict: dict) -> dict:
    """The key rewrites ``build_model_by_guess`` applies before it looks at any key."""
    if "adapter.body.0.resnets.0.block1.weight" in state_dict:  # diffusers T2IAdapter layout
        mapping = {}
        for i in range(4):
            for j in range(2):
                mapping[f"adapter.body.{i}.resnets.{j}."] = f"body.{i * 2 + j}."
            mapping[f"adapter.body.{i}."] = f"body.{i * 2}."
        mapping["adapter."] = ""
        state_dict = _replace_prefixes(state_dict, mapping)
    keys = list(state_dict)
    if any("image_proj." in k for k in keys) and any("ip_adapter." in k for k in keys):
        proj = {k[len("image_proj."):]: v for k, v in state_dict.items() if k.startswith("image_proj.")}
        ip = {k[len("ip_adapter."):]: v for k, v in state_dict.items() if k.startswith("ip_adapter.")}
        ip = {k: ip[k] for k in sorted(ip, key=lambda k: int(k.split(".")[0]))}  # int() raises on a non-numbered key
        state_dict = {"image_proj": proj, "ip_adapter": ip}
    state_dict = {k.replace("control_model.", ""): v for k, v in state_dict.items()}
    return {k.replace("adapter.", ""): v for k, v in state_dict.items()}


@dataclass
class Guess:
    kind: str  # "controlnet", "t2i_full", "t2i_style", "t2i_light", "ip_adapter" or "unknown"
    state_dict: dict
    sdxl: bool = False
    config: dict = field(default_factory=dict)


def guess(state_dict: dict, model_path: str) -> Guess:
    sd = normalise(state_dict)
    if "input_hint_block.0.weight" in sd:
        return Guess("controlnet", sd)
    if "conv_in.weight" in sd:
        c_out, cin = (int(n) for n in sd["conv_in.weight"].shape[:2])
        config = dict(cin=cin, channels=[c_out, c_out * 2, c_out * 4, c_out * 4], nums_rb=2, sk=True,
                      ksize=int(sd["body.0.block2.weight"].shape[2]),
                      use_conv=any(k.endswith("down_opt.op.weight") for k in sd), is_sdxl=cin in (256, 768))
        return Guess("t2i_full", sd, config["is_sdxl"], config)
    if "style_embedding" in sd:
        return Guess("t2i_style", sd)
    if "body.0.in_conv.weight" in sd:
        config = dict(channels=[320, 640, 1280, 1280], nums_rb=4, cin=int(sd["body.0.in_conv.weight"].shape[1]))
        return Guess("t2i_light", sd, False, config)  # Adapter_light always unshuffles by 8
    if "ip_adapter" in sd:
        config = ip_config(sd, Path(model_path).name)
        return Guess("ip_adapter", sd, config["is_sdxl"], config)
    return Guess("unknown", sd)


def t2i_full_shapes(cin, channels, nums_rb=2, ksize=1, sk=True, use_conv=False, is_sdxl=False) -> dict:
    """Parameter name -> shape of controlnet's ``Adapter`` built with these arguments."""
    shapes = {"conv_in.weight": (channels[0], cin, 3, 3), "conv_in.bias": (channels[0],)}
    down_at, no_down_at = ([2], [1]) if is_sdxl else ([3, 2, 1], [])
    n = 0
    for i, out_c in enumerate(channels):
        for r in range(nums_rb):
            in_c = channels[i - 1] if r == 0 and (i in down_at or i in no_down_at) else out_c
            down = r == 0 and i in down_at
            p = f"body.{n}."
            if in_c != out_c or not sk:
                shapes[p + "in_conv.weight"], shapes[p + "in_conv.bias"] = (out_c, in_c, ksize, ksize), (out_c,)
            shapes[p + "block1.weight"], shapes[p + "block1.bias"] = (out_c, out_c, 3, 3), (out_c,)
            shapes[p + "block2.weight"], shapes[p + "block2.bias"] = (out_c, out_c, ksize, ksize), (out_c,)
            if not sk:
                shapes[p + "skep.weight"], shapes[p + "skep.bias"] = (out_c, in_c, ksize, ksize), (out_c,)
            if down and use_conv:
                shapes[p + "down_opt.op.weight"], shapes[p + "down_opt.op.bias"] = (in_c, in_c, 3, 3), (in_c,)
            n += 1
    return shapes


def t2i_light_shapes(cin, channels=(320, 640, 1280, 1280), nums_rb=4) -> dict:
    """Parameter name -> shape of controlnet's ``Adapter_light`` (``down_opt`` is average pooling: no weights)."""
    shapes = {}
    for i, out_c in enumerate(channels):
        in_c, inter = (cin if i == 0 else channels[i - 1]), out_c // 4
        p = f"body.{i}."
        shapes[p + "in_conv.weight"], shapes[p + "in_conv.bias"] = (inter, in_c, 1, 1), (inter,)
        for r in range(nums_rb):
            for conv in ("block1", "block2"):
                key = f"{p}body.{r}.{conv}."
                shapes[key + "weight"], shapes[key + "bias"] = (inter, inter, 3, 3), (inter,)
        shapes[p + "out_conv.weight"], shapes[p + "out_conv.bias"] = (out_c, inter, 1, 1), (out_c,)
    return shapes


def ip_config(sd: dict, model_name: str) -> dict:
    """What ``IPAdapterModel.load`` derives from the split state dict and the file name."""
    proj, ip = sd["image_proj"], sd["ip_adapter"]
    is_full = "proj.3.weight" in proj
    is_plus = is_full or "latents" in proj or "perceiver_resampler.proj_in.weight" in proj
    width = int(ip["1.to_k_ip.weight"].shape[1])
    sdxl = width == 2048
    tips = dict(is_v2="v2" in model_name, is_faceid="faceid" in model_name, is_instantid="instant_id" in model_name,
                is_pulid="pulid" in model_name.lower(), is_portrait="portrait" in model_name)
    if is_plus:
        clip = int(proj["latents"].shape[2] if sdxl else (proj["proj.0.weight"].shape[1] if is_full
                                                             else proj["proj_in.weight"].shape[1]))
        tokens = 16
    else:
        clip = int(proj["proj.weight"].shape[1])
        tokens = 16 if tips["is_portrait"] else int(proj["proj.weight"].shape[0]) // width
    return dict(cross_attention_dim=width, is_sdxl=sdxl, is_plus=is_plus, is_full=is_full, tokens=tokens,
                clip_embeddings_dim=clip, **tips)


def image_proj_plain_shapes(width, clip, tokens) -> dict:
    return {"proj.weight": (tokens * width, clip), "proj.bias": (tokens * width,), "norm.weight": (width,),
            "norm.bias": (width,)}


def resampler_shapes(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult=4) -> dict:
    inner = dim_head * heads
    shapes = {"latents": (1, num_queries, dim), "proj_in.weight": (dim, embedding_dim), "proj_in.bias": (dim,),
              "proj_out.weight": (output_dim, dim), "proj_out.bias": (output_dim,), "norm_out.weight": (output_dim,),
              "norm_out.bias": (output_dim,)}
    for i in range(depth):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        for norm in ("norm1", "norm2"):
            shapes[a + norm + ".weight"], shapes[a + norm + ".bias"] = (dim,), (dim,)
        shapes[a + "to_q.weight"], shapes[a + "to_kv.weight"] = (inner, dim), (inner * 2, dim)
        shapes[a + "to_out.weight"] = (dim, inner)
        shapes[f + "0.weight"], shapes[f + "0.bias"] = (dim,), (dim,)
        shapes[f + "1.weight"], shapes[f + "3.weight"] = (dim * ff_mult, dim), (dim, dim * ff_mult)
    return shapes


def controlnet_resampler_shapes(config: dict, depth=4, dim_head=64, heads=None) -> dict:
    """The Resampler ``IPAdapterModel`` builds for a plus file; depth/heads default to its fixed choices."""
    sdxl, width = config["is_sdxl"], config["cross_attention_dim"]
    heads = heads if heads is not None else (20 if sdxl else 12)
    return resampler_shapes(dim=1280 if sdxl else width, depth=depth, dim_head=dim_head, heads=heads,
                            num_queries=16, embedding_dim=config["clip_embeddings_dim"], output_dim=width)


def shape_table(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}

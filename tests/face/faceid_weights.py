"""Random IP-Adapter FaceID state dicts in the released (tencent-ailab) nested layout.

The keys are written out here from the reference's modules (ip_adapter_faceid.py ``MLPProjModel``,
``ProjPlusModel``/``FacePerceiverResampler``; resampler.py ``Resampler`` for the SDXL Portrait
"unnorm" file; attention_processor_faceid.py ``LoRA(IP)AttnProcessor`` for the LoRA), not taken
from our loader's modules, so a loader that expects other names fails.
"""
from __future__ import annotations

import torch

SD15 = dict(context_dim=768, heads=12)  # FaceID Plus perceiver: dim = context, heads = context / 64
SDXL = dict(context_dim=2048, heads=32)
CLIP_H = dict(clip_dim=1280, clip_tokens=257)


def _perceiver(prefix: str, dim: int, heads: int, depth: int = 4, ff_mult: int = 4) -> dict[str, tuple[int, ...]]:
    inner = heads * 64
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        shapes |= {p + "0.norm1.weight": (dim,), p + "0.norm1.bias": (dim,), p + "0.norm2.weight": (dim,),
                   p + "0.norm2.bias": (dim,), p + "0.to_q.weight": (inner, dim), p + "0.to_kv.weight": (2 * inner, dim),
                   p + "0.to_out.weight": (dim, inner), p + "1.0.weight": (dim,), p + "1.0.bias": (dim,),
                   p + "1.1.weight": (dim * ff_mult, dim), p + "1.3.weight": (dim, dim * ff_mult)}
    return shapes


def image_proj_shapes(variant: str, context_dim: int, heads: int = 1, clip_dim: int = 96,
                      num_tokens: int | None = None) -> dict[str, tuple[int, ...]]:
    """``image_proj`` key -> shape for "faceid", "portrait", "plus" or "unnorm"."""
    if variant == "unnorm":  # Resampler(dim=1280, heads=20, num_queries=16, embedding_dim=512, output_dim=D)
        dim = 1280 if context_dim == 2048 else 64
        unnorm_heads = 20 if context_dim == 2048 else 1
        return {"latents": (1, 16, dim), "proj_in.weight": (dim, 512), "proj_in.bias": (dim,),
                "proj_out.weight": (context_dim, dim), "proj_out.bias": (context_dim,),
                "norm_out.weight": (context_dim,), "norm_out.bias": (context_dim,)} | _perceiver("", dim, unnorm_heads)
    tokens = num_tokens or (16 if variant == "portrait" else 4)
    shapes = {"proj.0.weight": (1024, 512), "proj.0.bias": (1024,), "proj.2.weight": (tokens * context_dim, 1024),
              "proj.2.bias": (tokens * context_dim,), "norm.weight": (context_dim,), "norm.bias": (context_dim,)}
    if variant == "plus":
        pre = "perceiver_resampler."
        shapes |= {pre + "proj_in.weight": (context_dim, clip_dim), pre + "proj_in.bias": (context_dim,),
                   pre + "proj_out.weight": (context_dim, context_dim), pre + "proj_out.bias": (context_dim,),
                   pre + "norm_out.weight": (context_dim,), pre + "norm_out.bias": (context_dim,)}
        shapes |= _perceiver(pre, context_dim, heads)
    return shapes


def ip_adapter_shapes(site_hidden: dict[int, int], context_dim: int, lora_rank: int) -> dict[str, tuple[int, ...]]:
    """``ip_adapter`` key -> shape: to_k_ip/to_v_ip per odd site number, LoRA on every processor when ``lora_rank``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for n, hidden in site_hidden.items():
        shapes[f"{n}.to_k_ip.weight"] = (hidden, context_dim)
        shapes[f"{n}.to_v_ip.weight"] = (hidden, context_dim)
        if lora_rank:
            for number, kv_in in ((n - 1, hidden), (n, context_dim)):  # self-attention n-1, cross-attention n
                for part, width in (("q", hidden), ("k", kv_in), ("v", kv_in), ("out", hidden)):
                    shapes[f"{number}.to_{part}_lora.down.weight"] = (lora_rank, width)
                    shapes[f"{number}.to_{part}_lora.up.weight"] = (hidden, lora_rank)
    return shapes


def _fill(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm_out.weight", ".1.0.weight")):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif key == "latents":
            out[key] = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
        else:
            fan_in = shape[-1] if len(shape) > 1 else 10
            out[key] = torch.randn(shape, generator=generator) / fan_in ** 0.5
    return out


def faceid_state_dict(variant: str, site_hidden: dict[int, int], context_dim: int, heads: int = 1, clip_dim: int = 96,
                      lora_rank: int | None = None, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` as the reference saves ``.bin`` files. The LoRA (rank 4 here,
    128 in the released files) is in FaceID and Plus files, not in Portrait ones."""
    g = torch.Generator().manual_seed(seed)
    rank = (0 if variant in ("portrait", "unnorm") else 4) if lora_rank is None else lora_rank
    return {"image_proj": _fill(image_proj_shapes(variant, context_dim, heads, clip_dim), g),
            "ip_adapter": _fill(ip_adapter_shapes(site_hidden, context_dim, rank), g)}


def flat(nested: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part, sd in nested.items() for k, v in sd.items()}


def face_embeddings(count: int, seed: int = 1, normed: bool = True) -> torch.Tensor:
    e = torch.randn(count, 512, generator=torch.Generator().manual_seed(seed))
    return e / e.norm(dim=1, keepdim=True) if normed else e * 20


def diffusers_processor_names(diffusers_unet) -> list[str]:
    """The attention modules of a diffusers UNet in ``attn_processors`` order: the order the reference numbers its
    processors in (tencent's ``ModuleList(unet.attn_processors.values())``; diffusers' ``_load_ip_adapter_loras``)."""
    return [name[:-len(".processor")] for name in diffusers_unet.attn_processors]


def kohya_lora(ip_adapter: dict[str, torch.Tensor], diffusers_unet, naming: str = "diffusers",
               alpha: float | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The in-file FaceID LoRA as a paired ``*_lora.safetensors`` in kohya's format, as tencent-ailab converted it:
    ``lora_unet_<module>.lora_down/up.weight`` with the module named the diffusers way, or (``naming="sgm"``) the
    way the WebUI's Lora extension converts those names (tests/training/webui_lora.py), minus its
    ``diffusion_model_`` prefix. ``alpha``: an ``.alpha`` per module (the file's scale is then alpha / rank, so the
    up weights are divided by it to keep the same delta); ``scale`` multiplies the up weights."""
    import sys
    from pathlib import Path

    helpers = str(Path(__file__).resolve().parents[1] / "training")  # the WebUI Lora extension's name mapping
    if helpers not in sys.path:
        sys.path.insert(0, helpers)
    from webui_lora import convert_diffusers_name_to_compvis

    out: dict[str, torch.Tensor] = {}
    for number, module in enumerate(diffusers_processor_names(diffusers_unet)):
        if f"{number}.to_q_lora.down.weight" not in ip_adapter:
            continue
        for part, suffix in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out_0")):
            name = f"lora_unet_{module.replace('.', '_')}_{suffix}"
            if naming == "sgm":
                name = "lora_unet_" + convert_diffusers_name_to_compvis(name, False)[len("diffusion_model_"):]
            down = ip_adapter[f"{number}.to_{part}_lora.down.weight"]
            up = ip_adapter[f"{number}.to_{part}_lora.up.weight"] * scale
            if alpha is not None:
                up = up * down.shape[0] / alpha
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
    return out

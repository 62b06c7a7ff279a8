"""IP-Adapter FaceID's trainable parts, in the released file's layout, and the attention LoRA's place in the UNet.

What the reference (tencent-ailab ``tutorial_train_faceid.py``) trains: the image projection (``MLPProjModel``:
the 512-wide normed face embedding -> 4 context tokens) and, in every attention processor, the parts of its
``LoRAAttnProcessor`` / ``LoRAIPAttnProcessor``: a LoRA (``LoRALinearLayer``s, rank 128, scale 1) on ``to_q``,
``to_k``, ``to_v`` and ``to_out`` of every self- and cross-attention, and in each cross-attention the
``to_k_ip``/``to_v_ip`` of the image tokens (copies of ``to_k``/``to_v`` at the start).

``FaceIDTrainingModel`` holds them under the released file's names, so its ``state_dict()`` is the file:
``image_proj.*`` and ``ip_adapter.{n}.to_k_ip.weight`` / ``ip_adapter.{n}.to_{q,k,v,out}_lora.{down,up}.weight``,
numbered as diffusers' ``attn_processors`` (``n`` even: the self-attention of the block whose cross-attention is
``n + 1``). ``formats/faceid.py`` reads it back, diffusers' ``load_ip_adapter`` too (its LoRA through
``_load_ip_adapter_loras``).

``LoRAHooks`` adds each LoRA to its base layer's output with a forward hook, the same ``W x + up(down(x))`` the
reference's processors compute, without replacing any module: the user's attention implementation keeps running
and ``close()`` leaves the UNet as it was. The image branch's ``to_out`` LoRA is applied by the training unit
(``ip_adapter.py``), since the panel's IP attention adds its term after ``to_out``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import IncompatibleModelError
from ...formats.faceid import LORA_PARTS, LoadedFaceIDAdapter
from ...models.faceid import FACE_EMBEDDING_DIM, FaceIDConfig, FaceIDProjection, FaceIDVariant
from ...unet.layout import IPSite
from .ip_sites import copy_key_values
from .lora import adding_hook

FACEID_TOKENS = 4  # the reference's num_tokens for FaceID; its loaders and diffusers' fix it too


class LoRALinear(nn.Module):
    """The reference's ``LoRALinearLayer`` without a network alpha (scale 1): ``up(down(x))``. ``down`` is drawn
    from N(0, 1/rank), ``up`` is zero, so a new LoRA changes nothing until it is trained."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


class FaceIDProcessor(nn.Module):
    """One attention processor's trained parts, by the file's names: ``to_{q,k,v,out}_lora`` (when the run has a
    LoRA) and, for a cross-attention, ``to_k_ip``/``to_v_ip``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, context_dim: int | None):
        super().__init__()
        if context_dim is not None:
            hidden = shapes["k"][1]
            self.to_k_ip = nn.Linear(context_dim, hidden, bias=False)
            self.to_v_ip = nn.Linear(context_dim, hidden, bias=False)
        for part, (in_features, out_features) in shapes.items() if rank else ():
            self.add_module(f"to_{part}_lora", LoRALinear(in_features, out_features, rank))

    def lora(self, part: str) -> LoRALinear | None:
        return getattr(self, f"to_{part}_lora", None)


def _base_layer(attn: nn.Module, part: str) -> nn.Linear:
    return attn.to_out[0] if part == "out" else getattr(attn, f"to_{part}")


def processor_paths(sites: tuple[IPSite, ...]) -> dict[int, str]:
    """Processor number -> attention module path: site ``n``'s attn2 and, as ``n - 1``, its block's attn1."""
    paths = {}
    for site in sites:
        if not site.path.endswith("attn2"):
            raise IncompatibleModelError(f"FaceID training: {site.path} is not a transformer block's attn2, so its "
                                         "self-attention cannot be found for the attention LoRA")
        paths[site.number - 1], paths[site.number] = site.path[:-1] + "1", site.path
    return paths


def layer_shapes(bound, sites: tuple[IPSite, ...]) -> dict[int, dict[str, tuple[int, int]]]:
    """Processor number -> part -> (in, out) of its base linear layers, read off the live UNet."""
    out = {}
    for number, path in processor_paths(sites).items():
        attn = bound.module(path)
        out[number] = {p: (int(_base_layer(attn, p).in_features), int(_base_layer(attn, p).out_features))
                       for p in LORA_PARTS}
    return out


class FaceIDTrainingModel(nn.Module):
    """``image_proj`` and ``ip_adapter.{n}`` as the file names them; ``site(n)`` is what the IP runtime reads."""

    def __init__(self, cfg: FaceIDConfig, shapes: dict[int, dict[str, tuple[int, int]]], rank: int):
        super().__init__()
        self.config, self.rank = cfg, rank
        self.image_proj = FaceIDProjection(cfg)
        self.ip_adapter = nn.ModuleDict({
            str(n): FaceIDProcessor(part_shapes, rank, cfg.context_dim if n % 2 else None)
            for n, part_shapes in sorted(shapes.items()) if rank or n % 2})

    def site(self, number: int) -> FaceIDProcessor:
        return self.ip_adapter[str(number)]

    def loras(self) -> dict[tuple[int, str], LoRALinear]:
        """(processor number, part) -> its LoRA (empty when the run trains none)."""
        return {(int(n), part): proc.lora(part) for n, proc in self.ip_adapter.items() for part in LORA_PARTS
                if proc.lora(part) is not None}


def faceid_config(context_dim: int) -> FaceIDConfig:
    """The reference's ``MLPProjModel(cross_attention_dim, id_embeddings_dim=512, num_tokens=4)``."""
    return FaceIDConfig(FaceIDVariant.FACEID, context_dim=context_dim, num_tokens=FACEID_TOKENS,
                        id_dim=FACE_EMBEDDING_DIM, id_hidden=2 * FACE_EMBEDDING_DIM)


def new_faceid_model(bound, sites: tuple[IPSite, ...], context_dim: int, rank: int) -> FaceIDTrainingModel:
    """A fresh model: torch's default initialisation for the projection (the reference's), each ``to_k_ip``/
    ``to_v_ip`` copied from its site's ``to_k``/``to_v``, the LoRA as ``LoRALinear`` starts it."""
    model = FaceIDTrainingModel(faceid_config(context_dim), layer_shapes(bound, sites), rank)
    copy_key_values(model, sites, bound)
    return model


def file_state(loaded: LoadedFaceIDAdapter) -> dict[str, torch.Tensor]:
    """A loaded FaceID file's tensors under ``FaceIDTrainingModel``'s names (the file's own)."""
    state = dict(loaded.model.state_dict())
    for n, lora in loaded.lora.items():
        for part in LORA_PARTS:
            state[f"ip_adapter.{n}.to_{part}_lora.down.weight"] = lora.down[part]
            state[f"ip_adapter.{n}.to_{part}_lora.up.weight"] = lora.up[part]
    return state


@dataclass
class LoRAHooks:
    """Forward hooks adding each LoRA to its base layer's output; ``detach()`` removes them all."""

    model: FaceIDTrainingModel
    bound: object
    sites: tuple[IPSite, ...]

    def __post_init__(self) -> None:
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        paths = processor_paths(self.sites)
        for (number, part), lora in self.model.loras().items():
            layer = _base_layer(self.bound.module(paths[number]), part)
            self._handles.append(layer.register_forward_hook(adding_hook(lora)))

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()


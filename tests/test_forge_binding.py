"""The Forge binding (lib_adapters/unet/forge.py) on single UNet calls of the Forge stub, against the A1111
binding on the same tiny UNets: every point (residual, context, attention, weights), SD1 and SDXL layouts,
main's and Classic's patchers; clones, deep copies, re-patching, closing, and the weights put back."""
from __future__ import annotations

import copy

import pytest
import torch

from lib_adapters.errors import IncompatibleModelError
from lib_adapters.inference.runtime import UnitRuntime
from lib_adapters.inference.session import GenerationSession
from lib_adapters.unet.a1111 import A1111Binding
from lib_adapters.unet.forge import MARK, ForgeBinding, attn2_key, block_key
from lib_adapters.unet.layout import IPSite, bind_layout
from lib_adapters.unet.points import LowRankDelta, Point, UNetCall, dense
from modules import sd_samplers_kdiffusion
from stubs_forge import builtins
from stubs_forge.patcher import CLASSIC, MAIN, memory, unet_patcher_class
from stubs_forge.sampling import KModel, call_options
from stubs_forge.unet import unet_forward
from tiny_model import build_tiny_sd_model

FLAVOURS = [MAIN, CLASSIC]


class _Runtime(UnitRuntime):
    label, weight, start, end = "test unit", 1.0, 0.0, 1.0


class Residuals(_Runtime):
    """A fixed random residual per level on cond rows; records the latent sizes it was told."""

    points = frozenset({Point.RESIDUAL})

    def __init__(self):
        self.sizes = []

    def residual(self, level: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor:
        self.sizes.append(call.latent_hw)
        r = torch.randn(h.shape[1:], generator=torch.Generator().manual_seed(level))[None] * 0.2
        return r * call.cond_mask.view(-1, 1, 1, 1)


class Tokens(_Runtime):
    points = frozenset({Point.CONTEXT})

    def context_tokens(self, rows: int, call: UNetCall | None, like: torch.Tensor) -> torch.Tensor:
        tokens = torch.randn(1, 3, like.shape[-1], generator=torch.Generator().manual_seed(7)).expand(rows, -1, -1)
        return tokens * call.cond_mask.view(-1, 1, 1)


class Attention(_Runtime):
    """Attends at every other call-order block; the term depends on the query and differs per row role."""

    points = frozenset({Point.ATTENTION})

    def attends(self, site: IPSite) -> bool:
        return site.block_index % 2 == 0

    def attention(self, site, attn, q, call):
        b, heads, n, d = q.shape
        out = q.transpose(1, 2).reshape(b, n, heads * d) @ attn.to_out[0].weight.T
        return out * (0.5 + call.cond_mask.view(-1, 1, 1))


class Deltas(_Runtime):
    points = frozenset({Point.WEIGHTS})

    def __init__(self, paths):
        self.paths = paths

    def weight_deltas(self, bound):
        return {path: torch.randn(bound.unet.get_parameter(path).shape, generator=torch.Generator().manual_seed(i)) * 0.1
                for i, path in enumerate(self.paths)}


class LowRank(Deltas):
    """Rank-2 LoRA deltas with a scale (what a FaceID unit's LoRA gives), two units' worth on the first path."""

    def weight_deltas(self, bound):
        out = {}
        for i, path in enumerate(self.paths):
            rows, cols = bound.unet.get_parameter(path).shape
            g = torch.Generator().manual_seed(10 + i)
            out[path] = LowRankDelta(torch.randn(rows, 2, generator=g) * 0.3, torch.randn(2, cols, generator=g) * 0.3, 0.7)
        first = self.paths[0]
        out[first] = out[first] + LowRankDelta(out[first].up.flip(0), out[first].down.flip(1), -0.4)
        return out


DELTAS = {"dense": Deltas, "low rank": LowRank}


def _deltas(unet, kind: str = "dense") -> Deltas:
    paths = [n for n, _ in unet.named_parameters() if n.endswith(("attn1.to_q.weight", "attn2.to_v.weight"))][:4]
    return DELTAS[kind](paths)


def _setup(arch: str, flavour: str):
    tiny = build_tiny_sd_model(arch, seed=0)
    unet = tiny.model.diffusion_model
    base = unet_patcher_class(flavour)(KModel(unet, sd_samplers_kdiffusion.CompVisDenoiser(tiny)))
    return unet, base


def _inputs(rows: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * rows, 4, 8, 8, generator=g)
    t = torch.full((2 * rows,), 400.0)
    context = torch.randn(2 * rows, 77, 32, generator=g)
    return x, t, context


def _a1111(unet, runtimes, x, t, context, rows: int):
    """Rows [cond..., uncond...], announced by the CFG denoiser as the WebUI does."""
    session = GenerationSession(bind_layout(unet), runtimes)
    session.on_denoiser(rows, rows, 1, 4)
    with A1111Binding(session), torch.no_grad():
        return unet(x, t, context=context)


def _forge(unet, patcher, x, t, context, rows: int):
    """The same rows in Forge's order, [uncond..., cond...], marked per call; returned in A1111's order."""
    swap = torch.cat([torch.arange(rows, 2 * rows), torch.arange(rows)])
    to = call_options(patcher.model_options, [1, 0], t[:rows])
    with torch.no_grad():
        out = unet_forward(unet, x[swap], t[swap], context=context[swap], transformer_options=to)
    return out[swap]


def _bind(unet, runtimes, rows: int = 2) -> ForgeBinding:
    session = GenerationSession(bind_layout(unet), runtimes)
    session.on_progress(1, 4)
    return ForgeBinding(session)


@pytest.mark.parametrize("kind", list(DELTAS))
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_point_agrees_with_the_a1111_binding(arch, flavour, kind):
    unet, base = _setup(arch, flavour)
    x, t, context = _inputs()
    plain = _a1111(unet, [], x, t, context, 2)
    residuals = Residuals()
    runtimes = [residuals, Tokens(), Attention(), _deltas(unet, kind)]
    reference = _a1111(unet, runtimes, x, t, context, 2)
    assert (reference - plain).abs().max() > 1e-2
    binding = _bind(unet, runtimes)
    clone = binding.patch(base)
    memory.load(clone)
    try:
        out = _forge(unet, clone, x, t, context, 2)
    finally:
        memory.load(base)
    assert (out - reference).abs().max() <= 1e-5
    assert set(residuals.sizes) == {(8, 8)}  # from original_shape
    assert len(residuals.sizes) == 2 * len(bind_layout(unet).layout.t2i_sites)


def _our_patch_values(clone, flavour) -> dict:
    """Parameter key -> the value of our weight patch on ``clone``."""
    if flavour == MAIN:
        ours = [v for k, v in clone.lora_patches.items() if k[0].startswith("adapters-extension/")]
        assert len(ours) == 1
        return {key: entries[0][1] for key, entries in ours[0].items()}
    return {key: entries[-1][1] for key, entries in clone.patches.items()}


@pytest.mark.parametrize("kind", list(DELTAS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_weights_are_forge_weight_patches_and_come_back_bit_identical(flavour, kind):
    unet, base = _setup("sd1", flavour)
    originals = {n: p for n, p in unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in originals.items()}
    deltas = _deltas(unet, kind)
    binding = _bind(unet, [deltas])
    clone = binding.patch(base)
    values = _our_patch_values(clone, flavour)
    assert set(values) == {f"diffusion_model.{p}" for p in deltas.paths}
    assert (base.lora_patches if flavour == MAIN else base.patches) == {}
    expected = {k: dense(v) for k, v in deltas.weight_deltas(bind_layout(unet)).items()}
    for key, value in values.items():
        shape = before[key[len("diffusion_model."):]].shape
        if kind == "low rank":  # Forge's own LoRA patch, kept factored: no weight-sized tensor in the patch
            assert value[0] == "lora" and value[1][2:] == (None, None, None)
            up, down = value[1][:2]
            assert up.shape[0] == shape[0] and down.shape[1] == shape[1] and up.shape[1] == down.shape[0] <= 4
        else:
            assert len(value) == 1 and value[0].shape == shape
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # nothing until Forge loads it
    memory.load(clone)
    for name, p in unet.named_parameters():
        if name in expected:
            assert torch.allclose(p, before[name] + expected[name], atol=1e-6)
        else:
            assert p is originals[name]
    memory.load(base)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    if flavour == MAIN:  # main's loader puts the very Parameter objects back
        assert all(p is originals[n] for n, p in unet.named_parameters())


@pytest.mark.parametrize("kind", list(DELTAS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_their_weight_patch_and_ours_both_merge(flavour, kind):
    """A user LoRA already on the patcher (Forge's forge_objects_after_applying_lora, a "lora" patch with an
    alpha at strength 0.8) keeps applying, on the same weight as ours; then its patcher alone, then the base."""
    unet, base = _setup("sd1", flavour)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(before[key].shape[0], 4, generator=g), torch.randn(4, before[key].shape[1], generator=g)
    theirs = 0.8 * (8.0 / 4) * (up @ down)
    lora = base.clone()
    patch = {f"diffusion_model.{key}": ("lora", (up, down, 8.0, None, None))}
    if flavour == MAIN:
        lora.add_patches(filename="their_lora.safetensors", patches=patch, strength_patch=0.8)
    else:
        lora.add_patches(patch, 0.8)
    deltas = DELTAS[kind]([key])
    clone = _bind(unet, [deltas]).patch(lora)
    memory.load(clone)
    ours = dense(deltas.weight_deltas(bind_layout(unet))[key])
    assert torch.allclose(unet.get_parameter(key), before[key] + theirs + ours, atol=1e-5)
    memory.load(lora)
    assert torch.allclose(unet.get_parameter(key), before[key] + theirs, atol=1e-5)
    memory.load(base)
    assert torch.equal(unet.get_parameter(key), before[key])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_patching_a_clone_of_ours_again_does_not_double(flavour):
    """Forge main's hires pass calls the hook on the previous pass's clone before resetting it."""
    unet, base = _setup("sd1", flavour)
    x, t, context = _inputs()
    runtimes = [Residuals(), Tokens(), Attention(), _deltas(unet)]
    binding = _bind(unet, runtimes)
    once = binding.patch(base)
    twice = binding.patch(once)
    to = twice.model_options["transformer_options"]
    assert len(to["block_modifiers"]) == 1
    assert len(to["patches"]["attn2_patch"]) == 1 and len(to["patches"]["attn2_output_patch"]) == 1
    memory.load(once)
    a = _forge(unet, once, x, t, context, 2)
    memory.load(twice)
    b = _forge(unet, twice, x, t, context, 2)
    memory.load(base)
    assert torch.equal(a, b)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_closures_survive_deep_copies_and_stop_when_closed(flavour):
    unet, base = _setup("sd1", flavour)
    x, t, context = _inputs()
    binding = _bind(unet, [Residuals(), Tokens(), Attention()])
    clone = binding.patch(base)
    later = clone.clone()  # another extension cloning after us: model_options deep-copied
    ours = [fn for fn in later.model_options["transformer_options"]["block_modifiers"] if getattr(fn, MARK, False)]
    assert ours and ours[0] is clone.model_options["transformer_options"]["block_modifiers"][0]  # shared, not copied
    assert copy.deepcopy(later.model_options)["transformer_options"]["patches"]["attn2_patch"][0] is \
        clone.model_options["transformer_options"]["patches"]["attn2_patch"][0]
    plain = _forge(unet, base, x, t, context, 2)
    assert (_forge(unet, later, x, t, context, 2) - plain).abs().max() > 1e-2
    binding.close()
    assert torch.equal(_forge(unet, later, x, t, context, 2), plain)
    assert binding.patch(base) is base  # closed: nothing more to register


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_nothing_in_use_returns_the_patcher_itself(flavour):
    unet, base = _setup("sd1", flavour)
    assert _bind(unet, []).patch(base) is base


def test_another_unet_is_refused():
    unet, base = _setup("sd1", MAIN)
    other, _ = _setup("sd1", MAIN)
    binding = _bind(other, [Residuals()])
    with pytest.raises(IncompatibleModelError, match="not the one the units were built for"):
        binding.patch(base)
    assert base.model_options == {"transformer_options": {}}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_their_replace_slot_is_kept_and_sees_our_context(flavour):
    """Forge's IP-Adapter owns attn2's replace slot: ours never writes it, and its replacement receives the
    context our attn2 patch extended (our tokens reach every attention, as on A1111)."""
    unet, base = _setup("sd1", flavour)
    x, t, context = _inputs()
    theirs = base.clone()
    builtins.TheirIPAdapter(unet, weight=1.0, seed=3).patch(theirs)
    slots = dict(theirs.model_options["transformer_options"]["patches_replace"]["attn2"])
    seen = []
    key = next(iter(slots))
    inner = slots[key]
    theirs.set_model_attn2_replace(lambda q, k, v, eo: (seen.append(k.shape[1]), inner(q, k, v, eo))[1], *key)
    clone = _bind(unet, [Tokens(), Attention()]).patch(theirs)
    replace = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replace) == set(slots) and all(not getattr(fn, MARK, False) for fn in replace.values())
    _forge(unet, clone, x, t, context, 2)
    assert seen == [77 + 3]  # the text tokens plus the 3 our context unit appended


def test_site_keys_match_forges_block_keys():
    for arch in ("sd1", "sdxl"):
        unet, _ = _setup(arch, MAIN)
        bound = bind_layout(unet)
        keys = [attn2_key(site.path) for site in bound.ip_sites()]
        assert len(set(keys)) == len(keys)
        for (kind, number, depth), site in zip(keys, bound.ip_sites()):
            container = unet.middle_block if kind == "middle" else getattr(unet, f"{kind}_blocks")[number]
            assert container[1].transformer_blocks[depth].attn2 is bound.module(site.path)
        assert [block_key(s.path) for s in bound.layout.t2i_sites] == (
            [("input", 2), ("input", 5), ("input", 8), ("input", 11)] if arch == "sd1"
            else [("input", 3), ("input", 5), ("input", 8), ("middle", 0)])

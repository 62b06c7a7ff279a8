"""The runtime protocol, the session and the A1111 binding: a runtime declares the points it acts at, the
session combines what the runtimes in their window say there, the binding wires that into the UNet and undoes it
exactly, weight patches included; every family the formats load has one builder in the registry."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fixtures.ip import clip_outputs, random_ip_state_dict
from fixtures.sessions import hooked
from fixtures.unets import LDM_SD1, build_ldm_unet
from lib_adapters.formats.adapter_file import LOADERS
from lib_adapters.formats.detect import ModelFamily
from lib_adapters.formats.ip import ip_from_state_dict
from lib_adapters.formats.reader import flatten_state_dict
from lib_adapters.inference.families import FAMILIES, family_for
from lib_adapters.inference.ip import IPUnitRuntime
from lib_adapters.inference.runtime import UnitRuntime
from lib_adapters.inference.session import GenerationSession
from lib_adapters.unet.a1111 import A1111Binding
from lib_adapters.unet.layout import bind_layout
from lib_adapters.unet.points import FORWARD_DELTA, LowRankDelta, Point, UNetCall, current_weight


@dataclass
class ConstantResidual(UnitRuntime):
    """A family of its own in a few lines: adds ``value`` after every T2I site, on cond rows only."""

    label: str
    value: float
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    points = frozenset({Point.RESIDUAL})

    def residual(self, level, h, call):
        mask = torch.ones(h.shape[0]) if call.cond_mask is None else call.cond_mask
        return torch.full_like(h, self.value * self.weight) * mask.view(-1, 1, 1, 1)


@dataclass
class WeightPatch(UnitRuntime):
    """A runtime that only changes weights for the generation (as a FaceID file's LoRA will)."""

    label: str
    deltas: dict
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    points = frozenset({Point.WEIGHTS})

    def weight_deltas(self, bound):
        return {path: (LowRankDelta(delta.up, delta.down, delta.scale * self.weight) if isinstance(delta, LowRankDelta)
                       else delta * self.weight) for path, delta in self.deltas.items()}


@pytest.fixture(scope="module")
def unet():
    return build_ldm_unet(LDM_SD1, seed=0)


def _inputs(rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 16, 16, generator=g), torch.full((rows,), 300.0), torch.randn(rows, 5, 32, generator=g)


def _snapshot(unet):
    return ({n: m.__dict__.get("forward") for n, m in unet.named_modules()},
            {k: v.clone() for k, v in unet.state_dict().items()}, [id(p) for p in unet.parameters()])


def _assert_same(unet, snapshot):
    forwards, state, ids = snapshot
    assert {n: m.__dict__.get("forward") for n, m in unet.named_modules()} == forwards
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert [id(p) for p in unet.parameters()] == ids


def test_a_new_runtime_needs_no_change_to_the_session(unet):
    """Two units of a family the session has never heard of: their residuals add, each in its window."""
    x, t, ctx = _inputs(rows=4)
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        with hooked(unet, [ConstantResidual("Adapter 1", 0.1), ConstantResidual("Adapter 2", 0.2, start=0.5)]) as s:
            s.on_denoiser(2, 2, 0, 10)  # step 0: only the first unit's window is open
            first = unet(x, t, context=ctx)
            s.on_denoiser(2, 2, 6, 10)
            both = unet(x, t, context=ctx)
        with hooked(unet, [ConstantResidual("Adapter 1", 0.3)]) as s:
            s.on_denoiser(2, 2, 0, 10)
            summed = unet(x, t, context=ctx)
    assert not torch.equal(first[:2], base[:2]) and torch.equal(first[2:], base[2:])  # cond rows only
    assert torch.allclose(both, summed, atol=1e-5) and not torch.allclose(both, first, atol=1e-4)


@pytest.mark.parametrize("factored", [False, True], ids=["dense", "low-rank"])
def test_weight_patches_act_for_the_generation_and_are_undone_exactly(unet, factored):
    """The delta acts as ``weight + delta`` while the generation runs, added at the layer's output: the weight
    tensors are never written (so the WebUI's Lora extension, which backs weights up, never sees our delta)."""
    bound = bind_layout(unet)
    path = bound.ip_sites()[0].path + ".to_k.weight"
    shape = unet.get_parameter(path).shape
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(shape[0], 2, generator=g) * 0.2, torch.randn(2, shape[1], generator=g) * 0.2
    delta = LowRankDelta(up, down, 0.5) if factored else (up @ down) * 0.5
    x, t, ctx = _inputs()
    snapshot = _snapshot(unet)
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        binding = A1111Binding(GenerationSession(bound, [WeightPatch("Adapter 1", {path: delta}, weight=2.0)]))
        binding.install()
        try:
            patched = unet(x, t, context=ctx)
            assert torch.equal(unet.get_parameter(path), snapshot[1][path])  # never written
            assert torch.allclose(current_weight(unet.get_submodule(path[:-len(".weight")])),
                                  snapshot[1][path] + (up @ down), atol=1e-6)
        finally:
            binding.restore()
        binding.restore()  # twice is harmless
        after = unet(x, t, context=ctx)
        manual = build_ldm_unet(LDM_SD1, seed=0)
        manual.get_parameter(path).add_(up @ down)  # 2.0 x 0.5
        expected = manual(x, t, context=ctx)
    assert torch.allclose(patched, expected, atol=1e-5) and not torch.allclose(patched, base, atol=1e-4)
    assert torch.equal(after, base)
    assert FORWARD_DELTA not in unet.get_submodule(path[:-len(".weight")]).__dict__
    _assert_same(unet, snapshot)


def test_deltas_of_two_runtimes_on_one_layer_add_up(unet):
    bound = bind_layout(unet)
    path = bound.ip_sites()[0].path + ".to_q.weight"
    shape = unet.get_parameter(path).shape
    g = torch.Generator().manual_seed(4)
    a = LowRankDelta(torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g), 0.1)
    b = LowRankDelta(torch.randn(shape[0], 3, generator=g), torch.randn(3, shape[1], generator=g), 0.2)
    session = GenerationSession(bound, [WeightPatch("Adapter 1", {path: a}), WeightPatch("Adapter 2", {path: b})])
    summed = session.weight_deltas()[path]
    assert isinstance(summed, LowRankDelta) and summed.up.shape[1] == 5
    assert torch.allclose(summed.dense(), a.dense() + b.dense(), atol=1e-5)
    mixed = GenerationSession(bound, [WeightPatch("Adapter 1", {path: a}), WeightPatch("Adapter 2", {path: b.dense()})])
    assert torch.allclose(mixed.weight_deltas()[path], a.dense() + b.dense(), atol=1e-5)


def test_the_binding_wires_only_the_points_in_use(unet):
    bound = bind_layout(unet)
    wrapped = lambda: {n for n, m in unet.named_modules() if "forward" in m.__dict__}  # noqa: E731
    with hooked(unet, [ConstantResidual("Adapter 1", 0.1)]):
        assert wrapped() == {"input_blocks.0"} | {s.path for s in bound.layout.t2i_sites}
    loaded = ip_from_state_dict(flatten_state_dict(random_ip_state_dict(bound, "base", 32)), "ip")
    ip = IPUnitRuntime.from_encoder_outputs("Adapter 1", loaded, clip_outputs("base"), clip_outputs("base", seed=2))
    with hooked(unet, [ip]):
        assert wrapped() == {"input_blocks.0"} | {s.path for s in bound.ip_sites()}
    assert wrapped() == set()


def test_rows_can_come_with_the_call_instead_of_the_denoiser(unet):
    """What a host that marks rows per call (Forge's cond_mark, uncond first) gives the session directly."""
    bound = bind_layout(unet)
    loaded = ip_from_state_dict(flatten_state_dict(random_ip_state_dict(bound, "plus", 32)), "ip")
    ip = IPUnitRuntime.from_encoder_outputs("Adapter 1", loaded, clip_outputs("plus"), clip_outputs("plus", seed=2))
    session = GenerationSession(bound, [ip])
    site = bound.ip_sites()[0]
    attn = bound.module(site.path)
    x = torch.randn(2, 256, attn.to_q.in_features)
    with torch.no_grad():
        cond_first = session.attention(site, attn, x, None, UNetCall((16, 16), torch.tensor([1.0, 0.0])))
        uncond_first = session.attention(site, attn, x.flip(0), None, UNetCall((16, 16), torch.tensor([0.0, 1.0])))
    assert torch.allclose(cond_first, uncond_first.flip(0), atol=1e-6)
    assert not torch.allclose(cond_first[0], cond_first[1], atol=1e-4)


def test_every_family_the_formats_load_has_one_builder():
    detected = [d for family in FAMILIES for d in family.detected]
    assert sorted(detected) == sorted(LOADERS) and len(detected) == len(set(detected))
    assert family_for(ModelFamily.T2I_LIGHT) is family_for(ModelFamily.T2I_FULL)
    for family in FAMILIES:
        assert family.unit_fields[0] == "model" and {"weight", "start", "end"} <= set(family.unit_fields)

"""Behaviour of a generation session on the genuine ldm UNet: restore, rows, sizes, caching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.adapters import diffusers_adapter, save_both_layouts
from fixtures.sessions import build_context, hooked
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet, install_webui_cat_hijack
from lib_adapters.errors import IncompatibleModelError
from lib_adapters.formats.t2i import load_t2i_adapter
from lib_adapters.inference import t2i
from lib_adapters.inference.session import GenerationSession
from lib_adapters.inference.t2i import T2IUnitRuntime
from lib_adapters.inference.units import AdapterUnit
from lib_adapters.unet.a1111 import A1111Binding
from lib_adapters.unet.layout import bind_layout


@pytest.fixture(scope="module")
def sd1_unet():
    return build_ldm_unet(LDM_SD1, seed=0)


@pytest.fixture(scope="module")
def sd1_adapter_file(tmp_path_factory):
    pth, _ = save_both_layouts(diffusers_adapter("full_adapter", 3, seed=4), tmp_path_factory.mktemp("a"), "depth")
    return pth


def _runtime(path, **unit_kw) -> T2IUnitRuntime:
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    unit = AdapterUnit(enabled=True, model="depth", **unit_kw)
    return T2IUnitRuntime.from_unit("Adapter 1", unit, load_t2i_adapter(path), image)


def _snapshot(unet):
    forwards = {name: m.__dict__.get("forward") for name, m in unet.named_modules()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    return forwards, state


def _assert_same(unet, snap):
    forwards, state = snap
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == forwards
    now = unet.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _call(unet, rows=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, size, size, generator=g)
    ctx = torch.randn(rows, 5, 32, generator=g)
    return unet(x, torch.full((rows,), 300.0), context=ctx)


def test_restore_is_exact_and_output_returns_to_baseline(sd1_unet, sd1_adapter_file):
    snap = _snapshot(sd1_unet)
    with torch.no_grad():
        base = _call(sd1_unet)
        with hooked(sd1_unet, [_runtime(sd1_adapter_file)]):
            changed = _call(sd1_unet)
        after = _call(sd1_unet)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(after, base)
    _assert_same(sd1_unet, snap)


def test_restore_after_sampling_raises(sd1_unet, sd1_adapter_file):
    snap = _snapshot(sd1_unet)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(sd1_unet, [_runtime(sd1_adapter_file)]):
            with torch.no_grad():
                _call(sd1_unet)
            raise RuntimeError("boom")
    _assert_same(sd1_unet, snap)


def test_chains_onto_another_extensions_wrapper_and_restores_it(sd1_unet, sd1_adapter_file):
    block = sd1_unet.input_blocks[2]
    calls = []
    original = block.forward

    def other_extension(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = other_extension
    try:
        with hooked(sd1_unet, [_runtime(sd1_adapter_file)]):
            with torch.no_grad():
                _call(sd1_unet)
        assert calls == [1], "the other extension's wrapper must still run under ours"
        assert block.__dict__["forward"] is other_extension
    finally:
        del block.__dict__["forward"]


def test_wrapped_over_by_someone_else_becomes_pass_through(sd1_unet, sd1_adapter_file):
    binding = A1111Binding(GenerationSession(bind_layout(sd1_unet), [_runtime(sd1_adapter_file)]))
    binding.install()
    block = sd1_unet.input_blocks[5]
    ours = block.forward
    block.forward = lambda *a, **k: ours(*a, **k)  # another extension installs after us
    binding.restore()
    with torch.no_grad():
        base_block = _call(sd1_unet)
    del block.__dict__["forward"]
    with torch.no_grad():
        assert torch.equal(base_block, _call(sd1_unet))


def test_features_computed_once_per_resolution(sd1_unet, sd1_adapter_file):
    runtime = _runtime(sd1_adapter_file)
    with torch.no_grad(), hooked(sd1_unet, [runtime]) as session:
        for step in range(5):
            session.on_denoiser(2, 2, step, 5)
            _call(sd1_unet, rows=4)
        assert runtime.forward_count == 1
        _call(sd1_unet, rows=2, size=24)  # the hires pass at another size
        assert runtime.forward_count == 2


@pytest.mark.parametrize("size", [13, 15, 21])
def test_sizes_that_do_not_divide_evenly(sd1_unet, sd1_adapter_file, size):
    install_webui_cat_hijack()
    with torch.no_grad():
        base = _call(sd1_unet, size=size)
        with hooked(sd1_unet, [_runtime(sd1_adapter_file)]):
            out = _call(sd1_unet, size=size)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3


def test_sdxl_odd_size_is_handled(tmp_path):
    install_webui_cat_hijack()
    unet = build_ldm_unet(LDM_SDXL, seed=1)
    pth, _ = save_both_layouts(diffusers_adapter("full_adapter_xl", 3, seed=1), tmp_path, "xl")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 15, 17, generator=g), torch.randn(1, 5, 48, generator=g)
    with torch.no_grad(), hooked(unet, [_runtime(pth)]):
        out = unet(x, torch.tensor([10.0]), context=ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_adapter_more_important_touches_cond_rows_only_whatever_the_call_split(sd1_unet, sd1_adapter_file):
    """Rows come from the denoiser's report: batched, split in chunks, or uncond skipped."""
    runtime = _runtime(sd1_adapter_file, control_mode="Adapter is more important")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)  # 2 cond rows then 2 uncond rows
    ctx = torch.randn(4, 5, 32, generator=g)
    t = torch.full((4,), 300.0)
    with torch.no_grad():
        base = sd1_unet(x, t, context=ctx)
        base_split = torch.cat([sd1_unet(x[:2], t[:2], context=ctx[:2]), sd1_unet(x[2:], t[2:], context=ctx[2:])])
        with hooked(sd1_unet, [runtime]) as session:
            session.on_denoiser(2, 2, 0, 10)
            batched = sd1_unet(x, t, context=ctx)
            session.on_denoiser(2, 2, 1, 10)
            split = torch.cat([sd1_unet(x[:2], t[:2], context=ctx[:2]), sd1_unet(x[2:], t[2:], context=ctx[2:])])
            session.on_denoiser(2, 2, 2, 10)
            skipped = sd1_unet(x[:2], t[:2], context=ctx[:2])  # uncond skipped: cond rows only
    for out, reference in ((batched, base), (split, base_split)):
        assert (out[:2] - reference[:2]).abs().max() > 1e-3
        assert torch.equal(out[2:], reference[2:]), "uncond rows must be untouched"
    assert torch.allclose(batched, split, atol=1e-4)
    assert torch.equal(skipped, split[:2])


def test_balanced_mode_touches_every_row(sd1_unet, sd1_adapter_file):
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 5, 32, generator=g), torch.full((4,), 300.0)
    with torch.no_grad():
        base = sd1_unet(x, t, context=ctx)
        with hooked(sd1_unet, [_runtime(sd1_adapter_file)]) as session:
            session.on_denoiser(2, 2, 0, 10)
            out = sd1_unet(x, t, context=ctx)
    assert ((out - base).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


def test_sampling_window(sd1_unet, sd1_adapter_file):
    runtime = _runtime(sd1_adapter_file, start=0.2, end=0.5)
    with torch.no_grad():
        base = _call(sd1_unet)
        with hooked(sd1_unet, [runtime]) as session:
            outs = []
            for step in range(10):
                session.on_denoiser(2, 0, step, 10)
                outs.append(_call(sd1_unet))
    active = [not torch.equal(o, base) for o in outs]
    assert active == [False, False, True, True, True, True, False, False, False, False]


def test_two_units_sum_per_level(sd1_unet, sd1_adapter_file, tmp_path):
    other, _ = save_both_layouts(diffusers_adapter("full_adapter", 1, seed=9), tmp_path, "canny")
    a, b = _runtime(sd1_adapter_file, weight=0.6), _runtime(other, weight=0.8)
    captured = {}

    def capture(name):
        def hook(module, inputs, output):
            captured.setdefault(name, []).append(output)
        return hook

    with torch.no_grad():
        base = _call(sd1_unet)
        for name, units in (("a", [a]), ("b", [b]), ("ab", [a, b])):
            handle = sd1_unet.input_blocks[3].register_forward_pre_hook(
                lambda m, args, name=name: captured.setdefault(name, []).append(args[0]))
            with hooked(sd1_unet, units):
                _call(sd1_unet)
            handle.remove()
        handle = sd1_unet.input_blocks[3].register_forward_pre_hook(
            lambda m, args: captured.setdefault("base", []).append(args[0]))
        _call(sd1_unet)
        handle.remove()
    h0 = captured["base"][0]
    delta_a, delta_b, delta_ab = (captured[k][0] - h0 for k in ("a", "b", "ab"))
    assert torch.allclose(delta_ab, delta_a + delta_b, atol=1e-5)  # after level 0 the two features simply add
    assert base.shape == (2, 4, 16, 16)


def test_sdxl_adapter_on_sd1_unet_is_refused(sd1_unet, tmp_path):
    """Checked once, when the unit's runtime is built, before its condition is preprocessed."""
    pth, _ = save_both_layouts(diffusers_adapter("full_adapter_xl", 3, seed=1), tmp_path, "xl")
    unit = AdapterUnit(enabled=True, model="xl")  # no image: the check comes first
    with pytest.raises(IncompatibleModelError, match="SDXL T2I-Adapter"):
        t2i.FAMILY.build(build_context(sd1_unet), "Adapter 1", unit, load_t2i_adapter(pth), pth)


def test_style_tokens_reach_cond_rows_of_every_cross_attention(sd1_unet, monkeypatch):
    from ldm.modules.attention import CrossAttention

    from lib_adapters.inference.style import StyleUnitRuntime

    seen = []
    original = CrossAttention.forward

    def recording(self, x, context=None, mask=None, **kwargs):
        if context is not None and context.shape[1] != x.shape[1]:
            seen.append(context)
        return original(self, x, context=context, mask=mask, **kwargs)

    monkeypatch.setattr(CrossAttention, "forward", recording)
    tokens = torch.randn(1, 8, 32)
    style = StyleUnitRuntime("Adapter 1", tokens, weight=0.5)
    with torch.no_grad(), hooked(sd1_unet, [style]) as session:
        session.on_denoiser(2, 2, 0, 10)
        _call(sd1_unet, rows=4)
    assert len(seen) == 16  # every attn2 of the SD1-shaped UNet
    for context in seen:
        assert context.shape == (4, 5 + 8, 32)
        assert torch.allclose(context[:2, 5:], (tokens * 0.5).expand(2, -1, -1))
        assert torch.equal(context[2:, 5:], torch.zeros(2, 8, 32))  # uncond rows: zero tokens

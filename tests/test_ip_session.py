"""IP-Adapter behaviour on the genuine ldm UNet: the text attention stays the user's, presets
select blocks, units stack, bad files are named."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fixtures.ip import clip_outputs, random_ip_state_dict
from fixtures.sessions import build_context, hooked
from fixtures.unets import LDM_SD1, LDM_SDXL, build_ldm_unet
from lib_adapters.errors import FormatError, IncompatibleModelError
from lib_adapters.formats.ip import ip_from_state_dict
from lib_adapters.formats.reader import flatten_state_dict
from lib_adapters.inference.blocks import BlockPreset, block_weights
from lib_adapters.inference import ip
from lib_adapters.inference.ip import IPUnitRuntime
from lib_adapters.inference.units import AdapterUnit, MultiImage
from lib_adapters.unet.layout import bind_layout


def _sdp_forward(self, x, context=None, mask=None, **kwargs):
    """A different attention implementation, installed at class level like the WebUI's optimisations."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    split = lambda t: t.view(b, -1, self.heads, inner // self.heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, inner)
    return self.to_out(out)


@pytest.fixture(scope="module")
def sd1():
    unet = build_ldm_unet(LDM_SD1, seed=0)
    return unet, bind_layout(unet)


def _runtime(bound, context_dim, variant="base", weight=1.0, seed=3, **kwargs):
    loaded = ip_from_state_dict(flatten_state_dict(random_ip_state_dict(bound, variant, context_dim, seed)), variant)
    return IPUnitRuntime.from_encoder_outputs("Adapter 1", loaded, clip_outputs(variant, seed=1),
                                              clip_outputs(variant, seed=2), weight=weight, **kwargs)


def _run(unet, units=(), rows=(1, 1), context_dim=32):
    g = torch.Generator().manual_seed(7)
    n = sum(rows)
    x, ctx = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 7, context_dim, generator=g)
    with torch.no_grad():
        if not units:
            return unet(x, torch.full((n,), 300.0), context=ctx)
        with hooked(unet, units) as session:
            session.on_denoiser(rows[0], rows[1], 0, 10)
            return unet(x, torch.full((n,), 300.0), context=ctx)


@pytest.mark.parametrize("implementation", ["ldm", "sdp"])
def test_scale_zero_is_bit_identical_under_each_attention_implementation(sd1, monkeypatch, implementation):
    from ldm.modules.attention import CrossAttention

    unet, bound = sd1
    if implementation == "sdp":
        monkeypatch.setattr(CrossAttention, "forward", _sdp_forward)
    base = _run(unet)
    assert torch.equal(_run(unet, [_runtime(bound, 32, weight=0.0)]), base)
    assert not torch.equal(_run(unet, [_runtime(bound, 32, weight=1.0)]), base)


def test_wrapper_calls_the_current_attention_implementation(sd1, monkeypatch):
    from ldm.modules.attention import CrossAttention

    unet, bound = sd1
    calls = []
    original = CrossAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CrossAttention, "forward", counting)
    _run(unet, [_runtime(bound, 32)])
    assert len(calls) == 32  # 16 transformer blocks x (attn1 + attn2): every text attention went through it


def test_image_branch_reuses_the_text_attention_query(sd1, monkeypatch):
    """to_q runs once per attn2 call (the text attention's), not twice."""
    unet, bound = sd1
    site = bound.module(bound.ip_sites()[0].path)
    calls = []
    original = site.to_q.forward
    monkeypatch.setattr(site.to_q, "forward", lambda x: calls.append(1) or original(x))
    _run(unet, [_runtime(bound, 32)])
    assert len(calls) == 1


def test_attention_that_does_not_call_to_q_on_x_gets_the_same_result(sd1, monkeypatch):
    """If the current attention hands to_q another tensor (here a copy of x), the query is not caught and is
    recomputed: the output equals the caught-query path (which the parity tests hold to diffusers)."""
    from ldm.modules.attention import CrossAttention

    unet, bound = sd1
    reused = _run(unet, [_runtime(bound, 32, variant="plus")])
    original = CrossAttention.forward
    monkeypatch.setattr(CrossAttention, "forward", lambda self, x, *a, **k: original(self, x.clone(), *a, **k))
    recomputed = _run(unet, [_runtime(bound, 32, variant="plus")])
    assert torch.allclose(recomputed, reused, atol=1e-6)
    assert not torch.equal(_run(unet), reused)


def test_uncond_rows_use_uncond_tokens(sd1):
    unet, bound = sd1
    both = _run(unet, [_runtime(bound, 32)], rows=(1, 1))
    swapped = _runtime(bound, 32)
    swapped.cond_tokens, swapped.uncond_tokens = swapped.uncond_tokens, swapped.cond_tokens
    reversed_roles = _run(unet, [swapped], rows=(1, 1))
    # row 0 is cond: it sees the cond tokens in `both` and the uncond ones in `reversed_roles`
    assert not torch.allclose(both[0], reversed_roles[0], atol=1e-4)


def test_style_preset_touches_only_its_blocks():
    unet = build_ldm_unet(LDM_SDXL, seed=1)
    bound = bind_layout(unet)
    weights = block_weights(BlockPreset.STYLE, bound.arch)
    assert weights == {6: 1.0}
    runtime = _runtime(bound, 48, block_weights=weights)
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [bound.module(s.path).register_forward_hook(
        lambda m, a, out, path=s.path: outputs.setdefault(path, []).append(out)) for s in bound.ip_sites()]
    try:
        _run(unet, context_dim=48)
        _run(unet, [runtime], context_dim=48)
    finally:
        for h in handles:
            h.remove()
    sites = {s.path: s.block_index for s in bound.ip_sites()}
    first_styled = min(p for p, i in sites.items() if i == 6)
    for path, (base, styled) in outputs.items():
        if sites[path] == 6:
            assert not torch.allclose(base, styled)
        elif path.startswith("input_blocks") or path.startswith("middle_block"):
            assert torch.equal(base, styled), path  # upstream of the style block: untouched
    assert first_styled.startswith("output_blocks.1")


def test_presets_follow_instantstyle():
    from lib_adapters.arch import BaseArch

    assert block_weights(BlockPreset.ALL, BaseArch.SD1) is None
    assert block_weights(BlockPreset.COMPOSITION, BaseArch.SD1) == {4: 0.25, 5: 1.0}
    assert block_weights(BlockPreset.STYLE_AND_COMPOSITION, BaseArch.SDXL, 0.5) == {3: 0.5, 6: 1.0}
    sd1_style = block_weights(BlockPreset.STYLE, BaseArch.SD2)
    assert set(sd1_style) == {0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15}


def test_two_units_stack_at_each_site(sd1):
    unet, bound = sd1
    base = _run(unet)
    a, b = _runtime(bound, 32, seed=3), _runtime(bound, 32, "plus", seed=4)
    delta_a, delta_b = _run(unet, [a]) - base, _run(unet, [b]) - base
    delta_ab = _run(unet, [a, b]) - base
    assert delta_ab.abs().max() > 1e-3
    assert not torch.allclose(delta_ab, delta_a) and not torch.allclose(delta_ab, delta_b)


def test_multiple_images_average_or_concatenate(sd1):
    _, bound = sd1
    loaded = ip_from_state_dict(flatten_state_dict(random_ip_state_dict(bound, "base", 32)), "base")
    images = clip_outputs("base", images=3)
    avg = IPUnitRuntime.from_encoder_outputs("a", loaded, images, torch.zeros(1, images.shape[1]))
    cat = IPUnitRuntime.from_encoder_outputs("a", loaded, images, torch.zeros(1, images.shape[1]),
                                             multi=MultiImage.CONCAT)
    assert avg.cond_tokens.shape == (1, 4, 32) and cat.cond_tokens.shape == (1, 12, 32)
    assert cat.uncond_tokens.shape == cat.cond_tokens.shape
    with torch.no_grad():
        per_image = loaded.model.image_proj(images)
    assert torch.allclose(avg.cond_tokens[0], per_image.mean(0), atol=1e-6)


def test_sdxl_ip_file_on_sd1_is_refused(sd1, tmp_path):
    """Checked once, when the unit's runtime is built, before any encoder is looked for."""
    unet, bound = sd1
    xl_bound = bind_layout(build_ldm_unet(LDM_SDXL))
    runtime = _runtime(xl_bound, 48)
    unit = AdapterUnit(enabled=True, model="xl")  # no encoder, no image: the check comes first
    with pytest.raises(IncompatibleModelError, match="IP-Adapter for a 48-wide context .* Pick an IP-Adapter made"):
        ip.FAMILY.build(build_context(unet), "Adapter 1", unit, runtime.adapter, tmp_path / "xl.bin")


def test_faceid_files_are_their_own_family_not_ip_adapters(sd1):
    """A FaceID key (its LoRA) makes the file the FaceID family: the IP loader refuses it naming the family, and
    the FaceID loader refuses a projection that no FaceID has (the file mixes two models)."""
    from lib_adapters.formats.faceid import faceid_from_state_dict

    _, bound = sd1
    nested = random_ip_state_dict(bound, "base", 32)
    nested["ip_adapter"]["0.to_q_lora.down.weight"] = torch.zeros(128, 32)
    with pytest.raises(FormatError, match="IP-Adapter FaceID file, not an IP-Adapter"):
        ip_from_state_dict(flatten_state_dict(nested), "faceid")
    with pytest.raises(FormatError, match="image projection of no FaceID model"):
        faceid_from_state_dict(flatten_state_dict(nested), "faceid")


def test_layout_numbers_follow_the_reference_table(sd1):
    _, bound = sd1
    sites = bound.ip_sites()
    assert [s.number for s in sites] == list(range(1, 32, 2))
    assert sites[-1].path.startswith("middle_block") and sites[-1].block_index == 6
    assert [s.path.split(".")[0] for s in sites[:6]] == ["input_blocks"] * 6
    assert math.isclose(sum(s.hidden for s in sites), 32 * 5 + 64 * 5 + 128 * 6)


def test_attention_mask_confines_the_image_prompt_to_its_region(sd1):
    """At the first attn2 (upstream of any IP influence) the image branch is exactly zero outside the mask."""
    unet, bound = sd1
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0  # left half of the latent
    first = bound.module(bound.ip_sites()[0].path)
    outputs = []
    handle = first.register_forward_hook(lambda m, a, out: outputs.append(out.reshape(out.shape[0], 16, 16, -1)))
    try:
        _run(unet)
        _run(unet, [_runtime(bound, 32, mask=mask)])
        _run(unet, [_runtime(bound, 32)])
    finally:
        handle.remove()
    base, masked, full = outputs
    assert torch.equal(masked[:, :, 8:], base[:, :, 8:])  # right half: untouched
    assert torch.allclose(masked[:, :, :8], full[:, :, :8], atol=1e-6)  # left half: the full image prompt
    assert not torch.allclose(full[:, :, 8:], base[:, :, 8:])


def test_layer_grid_rounds_up_like_the_unet():
    from lib_adapters.inference.ip import layer_grid

    assert layer_grid((15, 17), 15 * 17) == (15, 17)
    assert layer_grid((15, 17), 8 * 9) == (8, 9)
    assert layer_grid((15, 17), 2 * 3) == (2, 3)
    assert layer_grid((15, 17), 7) is None


def test_split_and_skipped_uncond_calls_give_the_same_rows_as_one_batch(sd1):
    unet, bound = sd1
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 7, 32, generator=g), torch.full((4,), 300.0)
    runtime = _runtime(bound, 32)
    with torch.no_grad(), hooked(unet, [runtime]) as session:
        session.on_denoiser(2, 2, 0, 10)
        batched = unet(x, t, context=ctx)
        session.on_denoiser(2, 2, 1, 10)
        split = torch.cat([unet(x[:2], t[:2], context=ctx[:2]), unet(x[2:], t[2:], context=ctx[2:])])
        session.on_denoiser(2, 2, 2, 10)
        skipped = unet(x[:2], t[:2], context=ctx[:2])
    assert torch.allclose(batched, split, atol=1e-4)
    assert torch.equal(skipped, split[:2])

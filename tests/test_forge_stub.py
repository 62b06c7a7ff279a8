"""The Forge stub (tests/stubs_forge) does what forge-host-api.md says Forge does, so the Forge tests test
against Forge's behaviour: where and in which order the patches run, what they receive, how the sampler
batches rows, the lifecycle of forge_objects, and the patchers' clone and weight semantics."""
from __future__ import annotations

import pytest
import torch

import driver
from fixtures.unets import install_webui_cat_hijack
from modules import script_callbacks, scripts
from stubs_forge import sampling
from stubs_forge import webui as forge_webui
from stubs_forge.patcher import CLASSIC, MAIN, ClassicUnetPatcher, UnetPatcher
from stubs_forge.sampling import call_options
from stubs_forge.unet import unet_forward
from tiny_model import build_tiny_sd_model


def _patcher(flavour=MAIN):
    tiny = build_tiny_sd_model("sd1", seed=0)
    from modules.sd_samplers_kdiffusion import CompVisDenoiser
    cls = UnetPatcher if flavour == MAIN else ClassicUnetPatcher
    return tiny.model.diffusion_model, cls(sampling.KModel(tiny.model.diffusion_model, CompVisDenoiser(tiny)))


def test_patch_points_run_in_forges_order_with_forges_arguments():
    unet, patcher = _patcher()
    events = []

    def modifier(h, flag, to):
        events.append((to["block"], flag))
        return h

    def attn2_patch(n, context, value, eo):
        assert value is context  # the value starts as the context
        eo["mine"] = n
        events.append((eo["block"], "attn2_patch", eo["transformer_index"], eo["block_index"], eo))
        return n, context, value

    def attn2_output(n, eo):
        assert eo["mine"].shape == n.shape  # the same extra_options object as the attn2 patch's
        events.append((eo["block"], "attn2_output", eo))
        return n

    def replace(q, k, v, eo):
        events.append((eo["block"], "attn2_replace"))
        return torch.nn.functional.scaled_dot_product_attention(
            *[t.reshape(t.shape[0], t.shape[1], eo["n_heads"], -1).transpose(1, 2) for t in (q, k, v)]
        ).transpose(1, 2).reshape(q.shape)

    patcher.add_block_modifier(modifier)
    patcher.set_model_attn1_patch(lambda n, c, v, eo: (events.append((eo["block"], "attn1_patch")), (n, c, v))[1])
    patcher.set_model_attn1_output_patch(lambda n, eo: (events.append((eo["block"], "attn1_output")), n)[1])
    patcher.set_model_attn2_patch(attn2_patch)
    patcher.set_model_attn2_replace(replace, "input", 4)
    patcher.set_model_attn2_output_patch(attn2_output)
    patcher.set_model_input_block_patch(lambda h, to: (events.append((to["block"], "input_block_patch")), h)[1])
    patcher.set_model_input_block_patch_after_skip(lambda h, to: (events.append((to["block"], "after_skip")), h)[1])
    x, t, c = torch.randn(4, 4, 8, 8), torch.full((4,), 300.0), torch.randn(4, 77, 32)
    to = call_options(patcher.model_options, [1, 0], t[:2])
    with torch.no_grad():
        unet_forward(unet, x, t, context=c, transformer_options=to)
    assert to["original_shape"] == [4, 4, 8, 8] and to["cond_mark"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert to["cond_indices"] == [2, 3] and to["uncond_indices"] == [0, 1]
    first = [e[:2] for e in events[:12]]
    assert first == [(("input", 0), "before"), (("input", 0), "after"), (("input", 0), "input_block_patch"),
                     (("input", 0), "after_skip"), (("input", 1), "before"), (("input", 1), "attn1_patch"),
                     (("input", 1), "attn1_output"), (("input", 1), "attn2_patch"), (("input", 1), "attn2_output"),
                     (("input", 1), "after"), (("input", 1), "input_block_patch"), (("input", 1), "after_skip")]
    attn2 = [e for e in events if e[1] == "attn2_patch"]
    assert [e[2] for e in attn2] == list(range(16)) and {e[3] for e in attn2} == {0}  # call-order index
    assert len({id(e[4]) for e in attn2}) == 16  # a fresh extra_options per transformer block (all still alive)
    assert [e[0] for e in events if e[1] == "attn2_replace"] == [("input", 4)]
    assert [e[0] for e in events if e[1] == "before"][-2:] == [("output", 11), ("last", 0)]


def test_control_is_popped_per_block_and_added_before_the_block_modifiers():
    unet, patcher = _patcher()
    seen = {}
    patcher.add_block_modifier(lambda h, flag, to: (seen.setdefault((to["block"], flag), h.clone()), h)[1])
    x, t, c = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0), torch.randn(2, 77, 32)
    control = {"input": [None] * 12, "middle": [], "output": []}
    control["input"][-3] = torch.ones(1, 32, 8, 8)  # popped third: input block 2
    with torch.no_grad():
        unet_forward(unet, x, t, context=c, control=control, transformer_options=dict(patcher.model_options["transformer_options"]))
    before_control = seen[(("input", 2), "after")]
    assert control["input"] == []
    with torch.no_grad():
        unet_forward(unet, x, t, context=c, transformer_options={"block_modifiers": [
            lambda h, flag, to: (seen.__setitem__("plain", h.clone()) if to["block"] == ("input", 2) and flag == "after"
                                 else None, h)[1]]})
    assert torch.allclose(before_control, seen["plain"] + 1)


def test_clone_deep_copies_options_and_shares_the_model_and_controlnets():
    _, patcher = _patcher()

    class Thing:
        pass

    def closure(h, flag, to):
        return h

    thing = Thing()
    patcher.add_block_modifier(closure)
    patcher.set_transformer_option("thing", thing)
    patcher.controlnet_linked_list = object()
    clone = patcher.clone()
    assert clone.model is patcher.model and clone.controlnet_linked_list is patcher.controlnet_linked_list
    assert clone.model_options["transformer_options"]["block_modifiers"][0] is closure
    assert clone.model_options["transformer_options"]["thing"] is not thing
    clone.add_block_modifier(closure)
    assert len(patcher.model_options["transformer_options"]["block_modifiers"]) == 1


def test_add_patches_signatures():
    _, main = _patcher(MAIN)
    _, classic = _patcher(CLASSIC)
    key = "diffusion_model.out.2.bias"
    with pytest.raises(TypeError):
        main.add_patches({key: (torch.zeros(4),)})
    assert main.add_patches(filename="a", patches={key: (torch.zeros(4),), "nope": (torch.zeros(1),)}) == {key}
    assert classic.add_patches({key: (torch.zeros(4),)}, 1.0, 1.0) == [key]


@pytest.fixture()
def webui(tmp_path):
    install_webui_cat_hijack()
    driver.reset_webui(tmp_path)
    model = driver.load_tiny_model("sd1")
    yield model
    sampling.MAX_CHUNKS_PER_CALL = None


def test_forge_main_baseline_is_the_a1111_baseline_bit_for_bit(webui):
    from test_forge_panel_e2e import Capture

    driver.build_runners([Capture])
    driver.txt2img(batch_size=2)
    stub = forge_webui.install(MAIN, webui)
    try:
        driver.txt2img(batch_size=2)
    finally:
        stub.uninstall()
    assert torch.equal(Capture.runs[-1][0], Capture.runs[-2][0])


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_rows_per_unet_call(webui, flavour):
    """Uncond first in one call; one chunk per call when memory is short; cond only at cfg 1 and on
    Classic's first step (its skip_early_cond check is true at step 0 with the default 0)."""
    driver.build_runners([])
    calls = []
    stub = forge_webui.install(flavour, webui)
    stub.base_unet.add_block_modifier(
        lambda h, flag, to: (calls.append(list(to["cond_or_uncond"])) if to["block"] == ("input", 0) and flag == "before"
                             else None, h)[1])
    params = []
    script_callbacks.on_cfg_denoiser(lambda p: params.append(p.x.shape[0]))
    try:
        driver.txt2img(batch_size=2, steps=3)
        first = [[0]] if flavour == CLASSIC else [[1, 0]]
        assert calls == first + [[1, 0]] * 2 and params == [2, 2, 2]  # the callback sees one row per image
        calls.clear()
        sampling.MAX_CHUNKS_PER_CALL = 1
        driver.txt2img(batch_size=2, steps=3)
        assert calls == (first if flavour == CLASSIC else [[1], [0]]) + [[1], [0]] * 2
        calls.clear()
        driver.txt2img(batch_size=2, steps=3, cfg_scale=1.0)
        assert calls == [[0]] * 3
    finally:
        stub.uninstall()


def test_forge_objects_lifecycle_and_main_has_no_model(webui):
    seen = []

    class Look(scripts.Script):
        def title(self):
            return "Look"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process_before_every_sampling(self, p, *args, **kwargs):
            seen.append(p.sd_model.forge_objects.unet)
            p.sd_model.forge_objects.unet = p.sd_model.forge_objects.unet.clone()

    driver.build_runners([Look])
    stub = forge_webui.install(MAIN, webui)
    try:
        from modules import shared
        assert not hasattr(shared.sd_model, "model") and shared.sd_model.forge_objects.unet is stub.base_unet
        driver.txt2img(enable_hr=True, hr_scale=2.0, denoising_strength=0.5, hr_second_pass_steps=2)
    finally:
        stub.uninstall()
    # first pass: the reset patcher; hires: first the first pass's clone (thrown away), then the reset one
    assert seen[0] is stub.base_unet and seen[1] is not stub.base_unet and seen[2] is stub.base_unet
    assert stub.calls == ["used", "discarded", "used"]

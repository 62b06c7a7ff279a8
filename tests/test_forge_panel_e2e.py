"""The Adapters panel on Forge (main and Classic, the stub of tests/stubs_forge) against the same panel on A1111.

One tiny SD1 model, one set of adapter files; each generation runs on the A1111 stub WebUI (forward
wrappers, rows from the CFG denoiser) and on the Forge stub (a cloned UNet patcher, rows per UNet call,
uncond first) and the sampled latents must agree within 1e-4 in fp32. ``skip_early_cond`` is a tiny
0.01 in these runs so every host runs the first step on cond rows only (Forge Classic does that at its
default 0, the others never do), which also exercises cond-only UNet calls.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import driver
from fixtures.adapters import diffusers_adapter, save_both_layouts
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import random_ip_state_dict
from fixtures.unets import install_webui_cat_hijack
from lib_adapters.errors import IncompatibleModelError
from lib_adapters.unet.layout import bind_layout
from lib_adapters.webui import host
from modules import paths, scripts, shared
from stubs_forge import builtins, sampling
from stubs_forge import webui as forge_webui
from test_panel_e2e import _condition, _load_script_module, _units
from test_panel_ip_e2e import _save_style_adapter

A1111, MAIN, CLASSIC = None, "main", "classic"
TOLERANCE = 1e-4


class Capture(scripts.Script):
    """Keeps each generation's sampled latents and the UNet patcher in effect when sampling ended."""

    runs: list = []

    def title(self):
        return "Capture"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def post_sample(self, p, ps, *args):
        samples = ps.samples if isinstance(ps.samples, torch.Tensor) else torch.stack(list(ps.samples))
        objects = getattr(p.sd_model, "forge_objects", None)
        Capture.runs.append((samples.clone(), getattr(objects, "unet", None)))


@dataclass
class Env:
    model: torch.nn.Module
    models: Path
    script_class: type


def fresh_panel(tmp_path):
    """A reset stub WebUI with the Adapters script module loaded afresh (no shared resources, no host detected)."""
    install_webui_cat_hijack()
    driver.reset_webui(tmp_path)
    module = _load_script_module()
    module.release_resources()
    import lib_adapters.webui.panel as panel
    panel._resources = None
    host.forget()
    return module


@pytest.fixture()
def env(tmp_path):
    module = fresh_panel(tmp_path)
    model = driver.load_tiny_model("sd1")
    models = Path(paths.models_path)
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=4), models / "adapters", "depth")
    save_both_layouts(diffusers_adapter("full_adapter", 1, seed=5), models / "adapters", "canny")
    bound = bind_layout(model.model.diffusion_model)
    for variant in ("base", "plus"):
        torch.save(random_ip_state_dict(bound, variant, 32, seed=11), models / "adapters" / f"ip-{variant}.bin")
    _save_style_adapter(models)
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript, Capture])
    shared.opts.data["skip_early_cond"] = 0.01
    Capture.runs = []
    yield Env(model, models, module.AdaptersScript)
    sampling.MAX_CHUNKS_PER_CALL = None
    host.forget()


def generate(env: Env, flavour: str | None, units=(), *, img2img=False, runner=None, stub_hook=None, **kwargs):
    """One generation on A1111 (``flavour`` None) or on the Forge stub; returns (processed, latents, stub)."""
    stub = forge_webui.install(flavour, env.model) if flavour else None
    host.forget()
    try:
        if stub_hook is not None:
            stub_hook(stub)
        kwargs.setdefault("batch_size", 2)
        scripts_args = dict(alwayson_scripts=_units(*units)) if units else {}
        if runner is not None:
            p = driver.make_img2img(kwargs.pop("init_images"), **kwargs) if img2img else driver.make_txt2img(**kwargs)
            processed = driver.run_processing(p, runner=runner, **scripts_args)
        elif img2img:
            processed = driver.img2img(kwargs.pop("init_images"), **scripts_args, **kwargs)
        else:
            processed = driver.txt2img(**scripts_args, **kwargs)
        return processed, Capture.runs[-1][0], stub
    finally:
        if stub is not None:
            stub.uninstall()
        host.forget()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


DEPTH = {"enabled": True, "model": "depth", "image": _condition(seed=6)}
CANNY_COND_ONLY = {"enabled": True, "model": "canny", "image": _condition(seed=7), "weight": 0.8,
                   "control_mode": "Adapter is more important"}
IP_BASE = {"enabled": True, "model": "ip-base", "image": _condition(seed=5), "weight": 1.5}
IP_PLUS = {"enabled": True, "model": "ip-plus", "image": _condition(seed=5), "weight": 1.5}
STYLE = {"enabled": True, "model": "t2i-style", "image": _condition(seed=9), "weight": 1.0}
_half = np.zeros((64, 64, 3), np.uint8)
_half[:, :32] = 255
IP_MASK_STYLE_WINDOW = dict(IP_PLUS, mask=_half, block_preset="Style", start=0.25, end=0.75)
IP_COMPOSITION = dict(IP_BASE, block_preset="Style and composition", composition_weight=0.5)
DEPTH_WINDOW = dict(DEPTH, start=0.5, end=1.0, weight=2.0, control_mode="My prompt is more important")
IP_MULTI_AVERAGE = dict(IP_PLUS, image=[_condition(seed=s) for s in (5, 6, 7)], multi_image="Average")
IP_MULTI_CONCAT = dict(IP_BASE, image=[_condition(seed=s) for s in (5, 6)], multi_image="Concatenate")

CASES = {
    "t2i": [DEPTH],
    "t2i cond rows only": [CANNY_COND_ONLY],
    "ip base": [IP_BASE],
    "ip plus": [IP_PLUS],
    "style": [STYLE],
    "several": [IP_PLUS, DEPTH, STYLE, CANNY_COND_ONLY],
    "ip mask, style blocks, window": [IP_MASK_STYLE_WINDOW],
    "ip style and composition": [IP_COMPOSITION],
    "t2i window": [DEPTH_WINDOW],
    "ip several images averaged": [IP_MULTI_AVERAGE],
    "ip several images concatenated": [IP_MULTI_CONCAT],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a1111_and_forge_agree(env, case):
    units = CASES[case]
    _, baseline, _ = generate(env, A1111)
    _, reference, _ = generate(env, A1111, units)
    assert _max_diff(reference, baseline) > 1e-2  # the units act, so agreeing below means something
    for flavour in (MAIN, CLASSIC):
        processed, latents, _ = generate(env, flavour, units)
        assert _max_diff(latents, reference) <= TOLERANCE, flavour
        assert "Adapter 1" in processed.infotexts[0]
        if "multi_image" in units[0]:
            assert f"Multi-image: {units[0]['multi_image']}" in processed.infotexts[0], processed.infotexts[0]


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_split_chunks_and_default_cfg_agree_with_a1111(env, flavour):
    """Forge runs cond and uncond as separate UNet calls when memory is short ([1] then [0]); with the
    default skip_early_cond main batches every step while Classic skips the uncond at step 0."""
    units = [IP_PLUS, CANNY_COND_ONLY, STYLE]

    def one_chunk_per_call(stub):
        sampling.MAX_CHUNKS_PER_CALL = 1

    shared.opts.data["skip_early_cond"] = 0.01
    _, reference, _ = generate(env, A1111, units)
    _, split, _ = generate(env, flavour, units, stub_hook=one_chunk_per_call)
    sampling.MAX_CHUNKS_PER_CALL = None
    assert _max_diff(split, reference) <= TOLERANCE
    shared.opts.data["skip_early_cond"] = 0.0
    _, default_a1111, _ = generate(env, A1111, units)
    _, default_forge, _ = generate(env, flavour, units)
    if flavour == MAIN:
        assert _max_diff(default_forge, default_a1111) <= TOLERANCE
    else:  # Classic's step 0 runs cond rows only: its own image, with the units applied all the same
        assert _max_diff(default_forge, reference) <= TOLERANCE


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_hires_fix_features_at_the_hires_size(env, flavour, monkeypatch):
    """Main calls process_before_every_sampling twice in the hires pass (the first clone is thrown away);
    the T2I features are computed once per size and the hires image matches A1111's."""
    from lib_adapters.models.t2i_adapter import FullAdapter

    sizes = []
    original = FullAdapter.forward
    monkeypatch.setattr(FullAdapter, "forward", lambda self, x: (sizes.append(tuple(x.shape[-2:])), original(self, x))[1])
    kwargs = dict(enable_hr=True, hr_scale=2.0, denoising_strength=0.6, hr_second_pass_steps=3, batch_size=1)
    _, reference, _ = generate(env, A1111, [DEPTH, IP_BASE], **kwargs)
    assert sizes == [(64, 64), (128, 128)]
    sizes.clear()
    _, hires, stub = generate(env, flavour, [DEPTH, IP_BASE], **kwargs)
    assert sizes == [(64, 64), (128, 128)]
    assert stub.calls == (["used", "discarded", "used"] if flavour == MAIN else ["used", "used"])
    assert reference.shape[-1] == 128 and _max_diff(hires, reference) <= TOLERANCE


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_img2img_agrees(env, flavour):
    from PIL import Image

    init = [Image.fromarray(_condition(seed=8))]
    _, reference, _ = generate(env, A1111, [DEPTH, IP_PLUS], img2img=True, init_images=init)
    _, forge, _ = generate(env, flavour, [DEPTH, IP_PLUS], img2img=True, init_images=init)
    assert _max_diff(forge, reference) <= TOLERANCE


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_disabled_units_leave_forge_bit_identical_and_untouched(env, flavour):
    no_extension = driver.build_runner([Capture], is_img2img=False)
    _, bare, _ = generate(env, flavour, runner=no_extension)
    off = dict(DEPTH, enabled=False)
    zero = dict(IP_PLUS, weight=0.0)
    for units in ([off], [zero], [off, zero]):
        processed, latents, stub = generate(env, flavour, units)
        assert torch.equal(latents, bare)
        assert Capture.runs[-1][1] is stub.base_unet  # the script never cloned the patcher
        assert "Adapter 1" not in processed.infotexts[0]


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_the_base_patcher_and_the_module_are_untouched(env, flavour):
    unet = env.model.model.diffusion_model
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    seen = {}

    def remember(stub):
        seen["stub"] = stub
        seen["options"] = copy.deepcopy(stub.base_unet.model_options)
        seen["original"] = stub.model.forge_objects_original

    _, _, stub = generate(env, flavour, [IP_PLUS, DEPTH, STYLE], stub_hook=remember)
    used = Capture.runs[-1][1]
    assert used is not stub.base_unet and used.model is stub.base_unet.model  # a clone of the same model
    assert stub.base_unet.model_options == seen["options"] == {"transformer_options": {}}
    assert "attn2" not in used.model_options["transformer_options"].get("patches_replace", {})
    assert all("forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
               for m in unet.modules())
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert seen["original"].unet is stub.base_unet


def _their(name, make):
    return builtins.script(name, make)


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_forge_controlnet_and_ip_adapter_chain_with_ours(env, flavour):
    """Forge's own IP-Adapter (the attn2 replace slot) and ControlNet (control residuals) in the same
    generation as our units: every contribution applies, whichever script patches the clone first."""
    their_ip = _their("Their IP", lambda unet: builtins.TheirIPAdapter(unet, weight=1.0, seed=3))
    their_cn = _their("Their ControlNet", lambda unet: builtins.TheirControlNet(unet, strength=0.5, seed=4))
    ours = [IP_PLUS, DEPTH]
    results = {}
    for name, classes in {"theirs": [their_ip, their_cn, Capture], "ours": [env.script_class, Capture],
                          "theirs then ours": [their_ip, their_cn, env.script_class, Capture],
                          "ours then theirs": [env.script_class, their_cn, their_ip, Capture]}.items():
        builtins.CALLS.clear()
        runner = driver.build_runner(classes, is_img2img=False)
        _, latents, _ = generate(env, flavour, ours if env.script_class in classes else (), runner=runner)
        results[name] = latents
        if their_ip in classes:
            assert builtins.CALLS["ip"] > 0 and builtins.CALLS["controlnet"] > 0
    both = results["theirs then ours"]
    assert _max_diff(both, results["theirs"]) > 1e-2 and _max_diff(both, results["ours"]) > 1e-2
    assert _max_diff(both, results["ours then theirs"]) <= 1e-5



@pytest.mark.parametrize("error", [IncompatibleModelError("a refiner's UNet"), RuntimeError("boom")])
def test_a_pass_the_units_cannot_patch_samples_as_forge_would_and_says_so(env, monkeypatch, error):
    """Registering on the pass's patcher fails (an incompatible UNet, or a bug): Forge's image, bit for bit,
    with the reason in the comments and in the infotext (for API clients)."""
    from lib_adapters.unet.forge import ForgeBinding

    def fail(self, unet_patcher):
        raise error

    no_extension = driver.build_runner([Capture], is_img2img=False)
    _, bare, _ = generate(env, MAIN, runner=no_extension)
    monkeypatch.setattr(ForgeBinding, "patch", fail)
    processed, latents, _ = generate(env, MAIN, [DEPTH])
    assert torch.equal(latents, bare)
    assert str(error) in processed.comments and str(error) in processed.infotexts[0]
    assert "Adapters skipped" in processed.infotexts[0]

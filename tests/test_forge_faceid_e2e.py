"""IP-Adapter FaceID units (plain and Plus v2, with the model's LoRA) through the panel on Forge (main and Classic,
tests/stubs_forge) against the same units on A1111: the sampled latents agree within 1e-4 in fp32; the LoRA
reaches Forge as its own factored "lora" weight patch on the pass's patcher clone, and the next generation
without the unit loads the base patcher and gets every weight back bit for bit (main: the very Parameter
objects); a prompt's ``<lora:...>`` (Forge's LoRA extension, tests/stubs_forge/lora.py) merges beside ours
and stays as it was once the unit is gone."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import driver
from face.face_pack import face_image, write_pack
from face.faceid_weights import faceid_state_dict, kohya_lora
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import CLIP_HIDDEN
from fixtures.unets import LDM_SD1, to_diffusers_unet
from lib_adapters.unet.forge import WEIGHTS_PREFIX, OurWeightPatch
from lib_adapters.unet.layout import bind_layout
from lib_adapters.webui import host
from modules import paths, shared
from stubs_forge import lora as forge_lora
from stubs_forge import webui as forge_webui
from test_forge_panel_e2e import A1111, CLASSIC, MAIN, TOLERANCE, Capture, Env, _max_diff, fresh_panel, generate
from test_panel_e2e import _units

FACEID, PLUS_V2 = "ip-adapter-faceid_sd15", "ip-adapter-faceid-plusv2_sd15"
LORA_EXTENSION = Path(__file__).resolve().parent / "stubs" / "extensions-builtin" / "Lora"
PLAIN, STYLED = "a tiny photo", "<lora:style:1> a tiny photo"


@pytest.fixture()
def env(tmp_path):
    module = fresh_panel(tmp_path)
    model = driver.load_tiny_model("sd1")
    unet = model.model.diffusion_model
    sites = {s.number: s.hidden for s in bind_layout(unet).ip_sites()}
    models = Path(paths.models_path)
    (models / "adapters").mkdir(parents=True, exist_ok=True)
    for name, variant in ((FACEID, "faceid"), (PLUS_V2, "plus")):
        nested = faceid_state_dict(variant, sites, LDM_SD1["context_dim"], heads=1, clip_dim=CLIP_HIDDEN, seed=3)
        torch.save(nested, models / "adapters" / f"{name}.bin")
    write_pack(models)
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    # a user's LoRA for the prompt, on the layers the FaceID LoRA patches too
    style = faceid_state_dict("faceid", sites, LDM_SD1["context_dim"], heads=1, seed=8)["ip_adapter"]
    lora_dir = Path(shared.cmd_opts.lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(style, to_diffusers_unet(unet, LDM_SD1), alpha=4.0, scale=0.5), str(lora_dir / "style.safetensors"))
    driver.build_runners([module.AdaptersScript, Capture])
    shared.opts.data["skip_early_cond"] = 0.01
    Capture.runs = []
    yield Env(model, models, module.AdaptersScript)
    host.forget()


def _unit(model=FACEID, **fields):
    return dict({"enabled": True, "model": model, "image": face_image(1), "weight": 1.5}, **fields)


def _on_forge(env: Env, flavour: str, jobs):
    """Several generations in one Forge session (Forge's LoRA extension in place): for each ``(units, prompt)``
    the processed result, its latents and the patcher it sampled with; then the UNet's parameters as the
    session left them (before the stub unloads anything)."""
    stub = forge_webui.install(flavour, env.model)
    host.forget()
    network = forge_lora.install(stub)
    try:
        results = []
        for units, prompt in jobs:
            args = dict(alwayson_scripts=_units(*units)) if units else {}
            processed = driver.txt2img(prompt=prompt, batch_size=2, **args)
            results.append((processed, Capture.runs[-1][0], Capture.runs[-1][1]))
        params = dict(env.model.model.diffusion_model.named_parameters())
        return results, params, network
    finally:
        forge_lora.uninstall(stub)
        stub.uninstall()
        host.forget()


def _our_weight_patches(patcher, flavour):
    if flavour == MAIN:
        return [v for k, v in patcher.lora_patches.items() if str(k[0]).startswith(WEIGHTS_PREFIX)]
    return [entry[1] for entries in patcher.patches.values() for entry in entries if isinstance(entry[1], OurWeightPatch)]


@pytest.mark.parametrize("name", [FACEID, PLUS_V2])
def test_faceid_units_agree_with_a1111_and_the_weights_come_back_exactly(env, name):
    unet = env.model.model.diffusion_model
    originals = dict(unet.named_parameters())
    before = {k: v.detach().clone() for k, v in originals.items()}
    unit = _unit(name)
    _, baseline, _ = generate(env, A1111, prompt=PLAIN)
    _, reference, _ = generate(env, A1111, [unit], prompt=PLAIN)
    _, without_lora, _ = generate(env, A1111, [dict(unit, faceid_lora=False)], prompt=PLAIN)
    assert _max_diff(reference, baseline) > 1e-2 and _max_diff(reference, without_lora) > 1e-3  # both parts act
    for flavour in (MAIN, CLASSIC):
        results, params, _ = _on_forge(env, flavour, [((), PLAIN), ([unit], PLAIN),
                                                      ((), PLAIN)])
        (_, bare, _), (processed, latents, patcher), (_, after, _) = results
        assert "skipped" not in processed.comments and "LoRA: on" in processed.infotexts[0]
        assert _max_diff(latents, reference) <= TOLERANCE, flavour
        assert len(_our_weight_patches(patcher, flavour)) >= 1  # the LoRA went to Forge as a weight patch
        assert torch.equal(after, bare)  # the next generation without the unit: Forge's image, bit for bit
        assert all(torch.equal(p, before[k]) for k, p in params.items())
        if flavour == MAIN:
            assert all(p is originals[k] for k, p in params.items())


def _on_a1111_with_lora(env: Env, jobs):
    """The latents of ``(units, prompt)`` jobs on A1111 with the stub's built-in Lora extension (which merges the
    prompt's LoRA into the weights and keeps it there until a prompt without it runs: one last plain job)."""
    for folder in (LORA_EXTENSION, LORA_EXTENSION.parents[2] / "training"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import networks

    networks.install()
    try:
        out = [generate(env, A1111, units, prompt=prompt)[1] for units, prompt in jobs]
        generate(env, A1111, prompt=PLAIN)
        return out
    finally:
        networks.uninstall()


@pytest.mark.parametrize("flavour", [MAIN, CLASSIC])
def test_a_prompt_lora_and_the_faceid_lora_merge_together_on_forge(env, flavour):
    """The prompt's LoRA on the layers ours patches too: with the unit, Forge agrees with A1111 (both LoRAs
    applied); then the prompt alone and a plain prompt: Forge's images without the unit, weights as they began."""
    unet = env.model.model.diffusion_model
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    unit = _unit(PLUS_V2)
    both_a1111, style_a1111 = _on_a1111_with_lora(env, [([unit], STYLED), ((), STYLED)])
    assert all(torch.equal(p, before[k]) for k, p in unet.named_parameters())
    results, params, network = _on_forge(env, flavour, [((), PLAIN), ((), STYLED), ([unit], STYLED),
                                                        ((), STYLED), ((), PLAIN)])
    (_, bare, _), (_, style, _), (_, both, patcher), (_, style_again, _), (_, plain, _) = results
    assert network.applied == []  # the last prompt dropped the LoRA
    assert _max_diff(style, bare) > 1e-3 and _max_diff(both, style) > 1e-2
    assert _max_diff(style, style_a1111) <= TOLERANCE and _max_diff(both, both_a1111) <= TOLERANCE
    assert torch.equal(style_again, style) and torch.equal(plain, bare)
    theirs = [k for k in patcher.lora_patches if k[0].endswith("style.safetensors")] if flavour == MAIN else None
    assert theirs is None or len(theirs) == 1  # their patch kept on our clone
    assert all(torch.equal(p, before[k]) for k, p in params.items())

"""IP-Adapter FaceID units through the Adapters script in the stub WebUI: the unit acts and is undone exactly,
weight 0 and a photo without a face give the baseline bit for bit, infotext round-trips, the API takes the FaceID
fields, the face preview draws what was found, and the model's LoRA composes with the WebUI's Lora extension
(tests/stubs/extensions-builtin/Lora) without confusing its weight backups."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import driver
from face.face_pack import face_image, write_pack
from face.faceid_weights import faceid_state_dict, kohya_lora
from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import CLIP_HIDDEN
from fixtures.unets import LDM_SD1, to_diffusers_unet
from lib_adapters.face import FACEID_PLUS_CROP, FaceAnalyzer, SessionOptions
from lib_adapters.unet.layout import bind_layout
from modules import paths, script_callbacks, shared
from modules.infotext_utils import parse_generation_parameters
from test_panel_e2e import _assert_restored, _b64, _load_script_module, _pixels, _unet_snapshot, _units

LORA_EXTENSION = Path(__file__).resolve().parent / "stubs" / "extensions-builtin" / "Lora"
TITLE = "Adapters"
FACEID, PLUS_V2 = "ip-adapter-faceid_sd15", "ip-adapter-faceid-plusv2_sd15"


def _fresh_webui(tmp_path, arch: str):
    """The stub WebUI on its tiny ``arch`` model with the panel's resources reset: (script module, model, attn2
    sites {number: width}, models folder with an empty adapters folder)."""
    driver.reset_webui(tmp_path)
    module = _load_script_module()
    module.release_resources()
    import lib_adapters.webui.panel as panel
    panel._resources = None
    model = driver.load_tiny_model(arch)
    sites = {s.number: s.hidden for s in bind_layout(model.model.diffusion_model).ip_sites()}
    models = Path(paths.models_path)
    (models / "adapters").mkdir(parents=True, exist_ok=True)
    return module, model, sites, models


@pytest.fixture()
def webui(tmp_path):
    module, model, sites, models = _fresh_webui(tmp_path, "sd1")
    nested = {}
    for name, variant in ((FACEID, "faceid"), (PLUS_V2, "plus"), ("ip-adapter-faceid-portrait_sd15", "portrait")):
        nested[name] = faceid_state_dict(variant, sites, LDM_SD1["context_dim"], heads=1, clip_dim=CLIP_HIDDEN, seed=3)
        torch.save(nested[name], models / "adapters" / f"{name}.bin")
    write_pack(models)
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript])
    yield model, models, nested


def _unit(model=FACEID, **fields):
    return dict({"enabled": True, "model": model, "image": face_image(1), "weight": 1.5}, **fields)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))


def test_a_faceid_unit_acts_restores_exactly_and_weight_0_is_the_baseline(webui):
    model, _, _ = webui
    snapshot = _unet_snapshot(model)
    base = driver.txt2img(batch_size=2)
    result = driver.txt2img(batch_size=2, alwayson_scripts=_units(_unit()))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.1
    assert "Adapter 1 skipped" not in result.comments
    _assert_restored(model, snapshot)
    zero = driver.txt2img(batch_size=2, alwayson_scripts=_units(_unit(weight=0.0)))
    assert _same(zero, base)
    assert _same(driver.txt2img(batch_size=2), base)
    _assert_restored(model, snapshot)


@pytest.mark.parametrize("model", [PLUS_V2, "ip-adapter-faceid-portrait_sd15"])
def test_plus_v2_and_portrait_units_act(webui, model):
    base = driver.txt2img()
    result = driver.txt2img(alwayson_scripts=_units(_unit(model, image=[face_image(1), face_image(2)])))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.1 and "skipped" not in result.comments


def test_no_face_skips_the_unit_with_a_message_and_the_image_is_the_baseline(webui):
    base = driver.txt2img()
    result = driver.txt2img(alwayson_scripts=_units(_unit(image=face_image(1, big=None))))
    assert _same(result, base)
    assert "Adapter 1 skipped" in result.comments and "No face found" in result.comments
    assert "No face found" in result.infotexts[0]  # API clients read the infotext
    # the real WebUI 1.10.1 showed 'Adapter 1 skipped: "Adapter 1: No face found ...' (the label twice)
    assert "Adapter 1: No face" not in result.comments and "Adapter 1: No face" not in result.infotexts[0]
    assert 'Adapter 1 skipped: "No face found' in result.infotexts[0]


def test_missing_face_models_say_which_file_goes_where(webui):
    _, models, _ = webui
    shutil.rmtree(models / "insightface")
    result = driver.txt2img(alwayson_scripts=_units(_unit()))
    assert "Adapter 1 skipped" in result.comments
    assert "det_10g.onnx" in result.comments and str(Path("insightface") / "models" / "buffalo_l") in result.comments


def test_infotext_holds_the_faceid_fields_and_read_generation_parameters_restores_them(webui):
    unit = _unit(PLUS_V2, weight=0.8, start=0.1, end=0.9, face_index=0, faceid_lora=False, faceid_lora_weight=0.6,
                 s_scale=0.5, face_pack="buffalo_l")
    result = driver.txt2img(alwayson_scripts=_units(unit))
    params = parse_generation_parameters(result.infotexts[0])
    labels = [part.split(": ")[0] for part in params["Adapter 1"].split(", ")]
    assert labels == ["Model", "Weight", "Start", "End", "Face", "Multi-image", "LoRA", "LoRA weight",
                      "Structure weight", "Face models"]
    script_callbacks.infotext_pasted_callback(result.infotexts[0], params)
    script = driver.scripts.scripts_txt2img.script(TITLE)
    by_label = {label: component for component, label in script.infotext_fields}
    pasted = {key[len("Adapter 1 "):]: value for key, value in params.items() if key.startswith("Adapter 1 ")}
    assert set(pasted) <= {label[len("Adapter 1 "):] for label in by_label}
    assert pasted["Face"] == "0" and pasted["LoRA"] is False and pasted["Structure weight"] == "0.5"
    assert pasted["Face models"] == "buffalo_l" and pasted["Model"] == PLUS_V2
    # the panel's fields set from the pasted values make the same unit, and the same image
    from lib_adapters.webui.panel.infotext import LABELS
    field_of = {label: name for name, label in LABELS.items()}
    restored = {field_of[label]: value for label, value in pasted.items() if label in field_of}
    restored.update(enabled=True, image=face_image(1))
    assert _same(driver.txt2img(alwayson_scripts=_units(restored)), result)


def test_default_largest_face_and_the_settings_pack_are_written(webui):
    result = driver.txt2img(alwayson_scripts=_units(_unit()))
    text = parse_generation_parameters(result.infotexts[0])["Adapter 1"]
    assert "Face: largest" in text and "LoRA: on" in text and "Face models: buffalo_l" in text
    assert "Structure weight" not in text  # FaceID (not Plus v2) has no structure weight
    params = parse_generation_parameters(result.infotexts[0])
    script_callbacks.infotext_pasted_callback(result.infotexts[0], params)
    assert params["Adapter 1 Face"] == "-1" and params["Adapter 1 LoRA"] is True


def test_the_api_takes_the_faceid_fields_and_several_photos(webui):
    one = _unit(image=_b64(face_image(1)))
    three = dict(one, image=[_b64(face_image(s)) for s in (1, 2, 3)])
    a = driver.txt2img(alwayson_scripts=_units(one), is_api=True)
    b = driver.txt2img(alwayson_scripts=_units(three), is_api=True)
    c = driver.txt2img(alwayson_scripts=_units(dict(three, multi_image="Concatenate")), is_api=True)
    assert not _same(a, b)
    # Average vs Concatenate: on this tiny model the attention is nearly uniform over the face tokens, so
    # attending to the three faces' tokens is the average of their values to the last bit of a pixel (strict MKL);
    # test_faceid_family checks the tokens of each mode, here the API field reaches the unit
    assert "Multi-image: Concatenate" in c.infotexts[0] and "Multi-image: Concatenate" not in b.infotexts[0]
    positional = [True, FACEID, "none", 1.5, 0.0, 1.0, "Balanced", "Crop and Resize", 512, -1, -1,
                  _b64(face_image(1)), "All blocks", 1.0, "Average", "Center crop", None, -1, "", True, 1.0, 1.0]
    assert _same(driver.txt2img(alwayson_scripts=_units(positional), is_api=True), a)
    off = driver.txt2img(alwayson_scripts=_units(dict(one, faceid_lora=False)), is_api=True)
    assert not _same(off, a) and "LoRA: off" in off.infotexts[0]
    bad = driver.txt2img(alwayson_scripts=_units(dict(one, face_index=-3)), is_api=True)
    assert "Adapter 1 skipped" in bad.comments and "face_index -3 is outside" in bad.comments


def test_img2img_uses_the_input_photo(webui):
    from PIL import Image

    init = Image.fromarray(face_image(1))
    base = driver.img2img([init], width=64, height=64)
    result = driver.img2img([init], width=64, height=64, alwayson_scripts=_units(_unit(image=None)))
    assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.05 and "skipped" not in result.comments


def test_the_face_preview_draws_box_keypoints_and_the_aligned_crop(webui):
    import gradio as gr

    _, models, _ = webui
    script = driver.scripts.scripts_txt2img.script(TITLE)
    image = face_image(4, big=(2, 5), small=(60, 10))
    shown = script._preview(_unit(preprocessor="face", image=image))
    assert shown.shape == (480, 640 + 8 + 480, 3)
    face = FaceAnalyzer.from_models_dir(models, "buffalo_l", SessionOptions(threads=1)).analyze(
        image, crop_size=FACEID_PLUS_CROP)
    x1, y1, x2, y2 = face.box.round().astype(int)
    assert tuple(shown[(y1 + y2) // 2, x1]) == (0, 220, 0)  # the chosen (largest) face's box, green
    left_eye = face.keypoints[0].round().astype(int)
    assert tuple(shown[left_eye[1], left_eye[0]]) == (0, 0, 255)  # eyes blue
    assert tuple(shown[80, 480 - 8]) == (160, 160, 160)  # the other face's box, grey
    crop = shown[:, 640 + 8:]
    import cv2
    assert np.abs(crop.astype(int) - cv2.resize(face.aligned_crop, (480, 480)).astype(int)).max() <= 1
    right = script._preview(_unit(preprocessor="face", image=image, face_index=1))
    assert tuple(right[80, 480 - 8]) == (0, 220, 0)
    with pytest.raises(gr.Error, match="No face found"):
        script._preview(_unit(preprocessor="face", image=face_image(1, big=None)))


# --- the LoRA and the WebUI's Lora extension ----------------------------------------------------------------------
@pytest.fixture()
def lora_extension(webui):
    model, models, nested = webui
    for folder in (LORA_EXTENSION, LORA_EXTENSION.parents[2] / "training"):  # the extension, its key mapping
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import networks

    networks.install()
    lora_dir = Path(shared.cmd_opts.lora_dir)
    reference = to_diffusers_unet(model.model.diffusion_model, LDM_SD1)
    sites = {s.number: s.hidden for s in bind_layout(model.model.diffusion_model).ip_sites()}
    style = faceid_state_dict("faceid", sites, LDM_SD1["context_dim"], heads=1, seed=8)["ip_adapter"]
    save_file(kohya_lora(style, reference, alpha=4.0, scale=0.5), str(lora_dir / "style.safetensors"))
    paired = kohya_lora(nested[FACEID]["ip_adapter"], reference)
    networks.list_available_networks()
    try:
        yield model, networks, lora_dir, paired
    finally:
        networks.uninstall()


def test_the_faceid_lora_never_confuses_the_lora_extensions_weight_backups(lora_extension):
    """A prompt LoRA first merged in the generation that also has a FaceID unit with its LoRA, then used alone,
    then dropped: every image is what it would be without the unit, and the weights end as they began. (With the
    delta written into the weights, the extension's backup would hold it and its merge would be lost.)"""
    model, networks, _, _ = lora_extension
    snapshot = _unet_snapshot(model)
    base = driver.txt2img()
    styled = "<lora:style:1> a tiny photo"
    both = driver.txt2img(prompt=styled, alwayson_scripts=_units(_unit()))
    assert [n.name for n in networks.loaded_networks] == ["style"]
    only_style = driver.txt2img(prompt=styled)
    plain = driver.txt2img()
    only_style_again = driver.txt2img(prompt=styled)
    assert not _same(only_style, base) and not _same(both, only_style)
    assert _same(only_style_again, only_style) and _same(plain, base)
    driver.txt2img()  # the extension restores its backup when its set of LoRAs becomes empty
    _assert_restored(model, snapshot)


def test_the_unit_applies_the_paired_file_as_the_lora_extension_does_and_never_twice(lora_extension):
    model, _, lora_dir, paired = lora_extension
    save_file(paired, str(lora_dir / f"{FACEID}_lora.safetensors"))
    tagged = f"<lora:{FACEID}_lora:1> a tiny photo"
    by_prompt = driver.txt2img(prompt=tagged, alwayson_scripts=_units(_unit(faceid_lora=False)))
    both_asked = driver.txt2img(prompt=tagged, alwayson_scripts=_units(_unit()))
    assert _same(both_asked, by_prompt)  # the unit saw the tag and did not apply the file again
    assert f"the prompt applies <lora:{FACEID}_lora> itself" in both_asked.comments
    by_unit = driver.txt2img(alwayson_scripts=_units(_unit()))  # the unit applies the file, forward-level
    none = driver.txt2img(alwayson_scripts=_units(_unit(faceid_lora=False)))
    assert np.abs(_pixels(by_unit)[0] - _pixels(by_prompt)[0]).max() <= 1  # rounding only: the same LoRA
    assert np.abs(_pixels(by_unit)[0] - _pixels(none)[0]).mean() > 0.1


# --- SDXL, .safetensors files, the paired LoRA in the Lora folder, the antelopev2 pack ---------------------------
XL = {"ip-adapter-faceid_sdxl": "faceid", "ip-adapter-faceid-plusv2_sdxl": "plus",
      "ip-adapter-faceid-portrait_sdxl": "portrait", "ip-adapter-faceid-portrait_sdxl_unnorm": "unnorm"}


@pytest.fixture()
def webui_xl(tmp_path):
    """The stub WebUI on its tiny SDXL model, with the SDXL FaceID files as flat .safetensors and two packs."""
    from fixtures.unets import LDM_SDXL
    from face.faceid_weights import flat

    module, model, sites, models = _fresh_webui(tmp_path, "sdxl")
    unet = model.model.diffusion_model
    context = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.in_features
    nested = {}
    for name, variant in XL.items():
        nested[name] = faceid_state_dict(variant, sites, context, heads=1, clip_dim=CLIP_HIDDEN, seed=5)
        save_file(flat(nested[name]), str(models / "adapters" / f"{name}.safetensors"))
    buffalo = write_pack(models)
    antelope = buffalo.parent / "antelopev2"  # the same graphs under antelopev2's file names
    antelope.mkdir()
    shutil.copy(buffalo / "det_10g.onnx", antelope / "scrfd_10g_bnkps.onnx")
    shutil.copy(buffalo / "w600k_r50.onnx", antelope / "glintr100.onnx")
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript])
    yield model, models, nested, to_diffusers_unet(unet, dict(LDM_SDXL, context_dim=context))


def test_sdxl_faceid_files_as_safetensors_act_and_restore(webui_xl):
    model, _, _, _ = webui_xl
    snapshot = _unet_snapshot(model)
    base = driver.txt2img()
    for name in XL:
        result = driver.txt2img(alwayson_scripts=_units(_unit(name, image=[face_image(1), face_image(2)])))
        assert "skipped" not in result.comments, (name, result.comments)
        assert np.abs(_pixels(base)[0] - _pixels(result)[0]).mean() > 0.1, name
        text = parse_generation_parameters(result.infotexts[0])["Adapter 1"]
        assert ("Structure weight" in text) is ("plusv2" in name) and ("LoRA: on" in text) is ("portrait" not in name)
        _assert_restored(model, snapshot)
    assert _same(driver.txt2img(), base)


def test_sdxl_paired_lora_in_the_lora_folder_is_the_one_applied(webui_xl):
    """The paired file (twice the file's own LoRA, in a sub-folder of models/Lora) replaces the in-file LoRA."""
    _, _, nested, reference = webui_xl
    name = "ip-adapter-faceid_sdxl"
    in_file = driver.txt2img(alwayson_scripts=_units(_unit(name)))
    off = driver.txt2img(alwayson_scripts=_units(_unit(name, faceid_lora=False)))
    folder = Path(shared.cmd_opts.lora_dir) / "faceid"
    folder.mkdir(parents=True)
    save_file(kohya_lora(nested[name]["ip_adapter"], reference, scale=2.0), str(folder / f"{name}_lora.safetensors"))
    paired = driver.txt2img(alwayson_scripts=_units(_unit(name)))
    half = driver.txt2img(alwayson_scripts=_units(_unit(name, faceid_lora_weight=0.5)))
    assert not _same(in_file, off) and not _same(paired, in_file)
    assert np.abs(_pixels(half)[0] - _pixels(in_file)[0]).max() <= 1  # 2 x file LoRA at 0.5 = the file's LoRA


def test_the_antelopev2_pack_is_a_unit_option(webui_xl):
    name = "ip-adapter-faceid_sdxl"
    buffalo = driver.txt2img(alwayson_scripts=_units(_unit(name)))
    antelope = driver.txt2img(alwayson_scripts=_units(_unit(name, face_pack="antelopev2")))
    assert _same(antelope, buffalo)  # the same graphs under the other pack's names find the same face
    assert "Face models: antelopev2" in antelope.infotexts[0] and "skipped" not in antelope.comments
    missing = driver.txt2img(alwayson_scripts=_units(_unit(name, face_pack="buffalo_s")))
    assert "Adapter 1 skipped" in missing.comments and "buffalo_s" in missing.comments

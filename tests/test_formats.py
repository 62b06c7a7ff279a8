"""Reading and recognising files: every bad input gets a clear error naming the file and the fix."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from fixtures.adapters import diffusers_adapter, save_both_layouts
from lib_adapters.errors import FormatError, MissingFileError
from lib_adapters.formats.detect import ModelFamily, T2ILayout, detect_family
from lib_adapters.formats.reader import flatten_state_dict, read_safetensors_metadata, read_state_dict
from lib_adapters.formats.t2i import load_t2i_adapter


@pytest.fixture()
def adapter_files(tmp_path):
    return save_both_layouts(diffusers_adapter("full_adapter", 3, seed=0), tmp_path, "depth")


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("which", [0, 1])
def test_truncated_files_say_download_again(adapter_files, which):
    path = adapter_files[which]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="download it again") as info:
        load_t2i_adapter(path)
    assert path.name in str(info.value)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"conv_in.weight": Evil()}, f)
    with pytest.raises(FormatError):
        read_state_dict(path)


def test_unknown_file_lists_its_keys(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(path))
    with pytest.raises(FormatError, match="not a recognised adapter file .*foo.bar"):
        load_t2i_adapter(path)


@pytest.mark.parametrize("key,family", [
    ("control_model.input_hint_block.0.weight", "ControlNet"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ("model.diffusion_model.input_blocks.0.0.weight", "Stable Diffusion checkpoint"),
])
def test_other_model_kinds_are_named(tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    with pytest.raises(FormatError, match=f"this is a {family} file, not a T2I-Adapter"):
        load_t2i_adapter(path)


def test_missing_keys_are_reported(tmp_path, adapter_files):
    sd = read_state_dict(adapter_files[0])
    sd.pop("body.3.block2.weight")
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(FormatError, match="missing 1 keys .*body.3.block2.weight"):
        load_t2i_adapter(path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(FormatError, match="unsupported file type"):
        read_state_dict(path)


def test_detection_ignores_file_names(tmp_path, adapter_files):
    misleading = tmp_path / "ip-adapter_sdxl_controlnet_lora.pth"
    misleading.write_bytes(adapter_files[0].read_bytes())
    loaded = load_t2i_adapter(misleading)
    assert loaded.family is ModelFamily.T2I_FULL and loaded.config.image_channels == 3


def test_prefixed_tencentarc_and_diffusers_layouts_are_told_apart(adapter_files):
    tencent = read_state_dict(adapter_files[0])
    prefixed = {f"adapter.{k}": v for k, v in tencent.items()}
    assert detect_family(prefixed)[:2] == (ModelFamily.T2I_FULL, T2ILayout.TENCENTARC)
    assert detect_family(read_state_dict(adapter_files[1]))[:2] == (ModelFamily.T2I_FULL, T2ILayout.DIFFUSERS)


def test_nested_dicts_flatten_and_wrappers_unwrap():
    t = torch.ones(1)
    assert set(flatten_state_dict({"image_proj": {"proj.weight": t}, "ip_adapter": {"1.to_k_ip.weight": t}})) == {
        "image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"}
    assert set(flatten_state_dict({"state_dict": {"a": t}, "epoch": 3})) == {"a"}


def test_safetensors_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1)}, str(path), metadata={"ss_network_dim": "4"})
    assert read_safetensors_metadata(path) == {"ss_network_dim": "4"}
    assert read_safetensors_metadata(tmp_path / "missing.safetensors") == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_as_damaged(adapter_files, bad):
    from lib_adapters.formats.adapter_file import load_adapter

    sd = read_state_dict(adapter_files[1])  # diffusers layout, safetensors
    keys = list(sd)
    sd[keys[3]] = sd[keys[3]].clone()
    sd[keys[3]].view(-1)[1] = bad
    sd[keys[-1]] = sd[keys[-1]].clone().fill_(float("nan"))  # a later bad tensor is not the one named
    damaged = adapter_files[1].with_name("damaged.safetensors")
    save_file(sd, str(damaged))
    for load in (load_adapter, load_t2i_adapter):
        with pytest.raises(FormatError) as info:
            load(damaged)
        message = str(info.value)
        assert message.startswith("damaged.safetensors: the tensor ") and f"'{keys[3]}'" in message
        assert "Download it again" in message
        assert ("1 NaN and 0 infinite" if bad != bad else "0 NaN and 1 infinite") in message


def test_non_finite_ip_adapter_pickle_is_refused(tmp_path):
    from fixtures.ip import random_ip_state_dict
    from lib_adapters.formats.ip import load_ip_adapter
    from lib_adapters.tiny import TINY_SD1, build_tiny_unet
    from lib_adapters.unet.layout import bind_layout

    nested = random_ip_state_dict(bind_layout(build_tiny_unet(TINY_SD1, seed=0)), "plus", 32)
    nested["ip_adapter"]["1.to_v_ip.weight"][0, 0] = float("inf")
    torch.save(nested, tmp_path / "ip.bin")
    with pytest.raises(FormatError, match=r"ip.bin: the tensor 'ip_adapter.1.to_v_ip.weight' holds 0 NaN and 1 inf"):
        load_ip_adapter(tmp_path / "ip.bin")

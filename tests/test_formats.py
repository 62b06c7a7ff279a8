"""Reading and recognising files: every bad input gets a clear error naming the file and the fix."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from fixtures.adapters import diffusers_adapter, save_both_layouts
from lib_adapters.errors import FormatError, MissingFileError
from lib_adapters.formats.detect import KeyLayout, ModelFamily, detect_family
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
    assert detect_family(prefixed)[:2] == (ModelFamily.T2I_FULL, KeyLayout.TENCENTARC)
    assert detect_family(read_state_dict(adapter_files[1]))[:2] == (ModelFamily.T2I_FULL, KeyLayout.DIFFUSERS)


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

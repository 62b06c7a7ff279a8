"""CLIP vision encoders: loaded from local files, configured from shapes, found by width."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.catalog import EncoderCatalog
from lib_adapters.errors import FormatError, MissingFileError
from lib_adapters.formats.clip_vision import load_clip_vision
from lib_adapters.models.clip_vision import CropMode


def _image(h=40, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_loaded_encoder_reproduces_the_original(tmp_path):
    original = tiny_clip_vision()
    encoder = load_clip_vision(save_clip_vision(original, tmp_path))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = original(pixel_values=pixels, output_hidden_states=True)
    assert torch.equal(encoder.encode(pixels, hidden_states=False), ref.image_embeds)
    assert torch.equal(encoder.encode(pixels, hidden_states=True), ref.hidden_states[-2])


def test_center_crop_matches_transformers_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    encoder = load_clip_vision(save_clip_vision(tiny_clip_vision(), tmp_path))
    image = _image()
    ours = encoder.preprocess([image], CropMode.CENTER)
    ref = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=[image], return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().max() < 0.02  # PIL's bicubic vs transformers' rounding of the resized image


def test_squash_keeps_the_whole_image(tmp_path):
    encoder = load_clip_vision(save_clip_vision(tiny_clip_vision(), tmp_path))
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :16] = 255  # a white band on the left quarter: cropped away by centre crop, kept by squash
    squashed, cropped = encoder.preprocess([image], CropMode.SQUASH), encoder.preprocess([image], CropMode.CENTER)
    assert squashed[0, 0, :, :4].mean() > 1.5 and cropped[0, 0, :, :4].mean() < -1.5


def test_uncond_follows_the_reference(tmp_path):
    encoder = load_clip_vision(save_clip_vision(tiny_clip_vision(), tmp_path))
    cond, uncond = encoder.encode_images([_image()], CropMode.CENTER, hidden_states=False)
    assert torch.equal(uncond, torch.zeros_like(cond))
    _, uncond_hidden = encoder.encode_images([_image()], CropMode.CENTER, hidden_states=True)
    assert torch.equal(uncond_hidden, encoder.encode(torch.zeros(1, 3, 32, 32), hidden_states=True))


def test_no_image_hidden_states_are_computed_once_per_encoder(tmp_path):
    path = save_clip_vision(tiny_clip_vision(), tmp_path / "enc.safetensors")
    encoder = load_clip_vision(path)
    calls = []
    encoder.model.register_forward_hook(lambda m, i, o: calls.append(1))
    _, first = encoder.encode_images([_image(seed=1)], CropMode.CENTER, hidden_states=True)
    first.add_(1.0)  # a caller altering its copy must not alter the cache
    _, second = encoder.encode_images([_image(seed=2)], CropMode.CENTER, hidden_states=True)
    assert len(calls) == 3  # two images, one "no image"
    size = encoder.shape.image_size
    assert torch.equal(second, encoder.encode(torch.zeros(1, 3, size, size), hidden_states=True))


def test_catalog_picks_the_encoder_by_width(tmp_path):
    small = save_clip_vision(tiny_clip_vision(hidden=96, projection=64), tmp_path, "a")
    wide = save_clip_vision(tiny_clip_vision(hidden=128, projection=80), tmp_path, "b")
    catalog = EncoderCatalog([tmp_path])
    assert catalog.find(True, 96, "x") == small and catalog.find(False, 80, "x") == wide
    with pytest.raises(MissingFileError, match="needs a ViT-H/14 .* CLIP vision encoder .*h94/IP-Adapter"):
        catalog.find(True, 1280, "ViT-H/14 (hidden states of width 1280)")


def test_not_an_encoder(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(FormatError, match="not a CLIP vision encoder"):
        load_clip_vision(path)


def test_an_encoder_with_nan_weights_is_refused_as_damaged(tmp_path):
    model = tiny_clip_vision()
    with torch.no_grad():
        model.vision_model.encoder.layers[1].mlp.fc2.weight[3, 4] = float("nan")
    path = save_clip_vision(model, tmp_path)
    with pytest.raises(FormatError, match=r"clip_vision_tiny.safetensors: the tensor "
                                          r"'vision_model.encoder.layers.1.mlp.fc2.weight' holds 1 NaN .*Download it again"):
        load_clip_vision(path)


def test_a_loaded_encoder_keeps_no_memory_map_of_its_file(tmp_path):
    """safetensors maps the file; the encoder must own its weights, so the file can be replaced while it is cached."""
    import os

    path = save_clip_vision(tiny_clip_vision(), tmp_path)
    encoder = load_clip_vision(path)
    maps = open(f"/proc/{os.getpid()}/maps").read() if os.path.exists("/proc/self/maps") else ""
    if not maps:
        pytest.skip("no /proc/<pid>/maps on this system")
    assert str(path) not in maps
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())

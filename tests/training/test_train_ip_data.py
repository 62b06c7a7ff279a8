"""IP-Adapter training data: the reference's JSON list, bad files reported one by one before training, the
CLIP feature cache and its keys, and finding the CLIP vision encoder as the panel does."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import make_shapes_dataset, shape_image, tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.arch import BaseArch
from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.formats.clip_vision import load_clip_vision
from lib_adapters.models.clip_vision import CropMode, EncoderNeed
from lib_adapters.training.config import IPAdapterConfig, IPProjection, TrainConfig
from lib_adapters.training.data import DatasetInvalidError, ProblemKind
from lib_adapters.training.ip_data import ImageFeatures, load_training_encoder, reference_encoder
from lib_adapters.training.loop import train
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_clip_vision(tiny_clip_vision(), tmp_path_factory.mktemp("clip"))


def _config(dataset: Path, out: Path, encoder: Path, **ip) -> TrainConfig:
    return TrainConfig(dataset, out, "ip", method="ip_adapter", resolution=64, steps=1, batch_size=2,
                       ip=IPAdapterConfig(image_encoder=encoder, **ip))


def test_a_json_list_dataset_trains_with_images_under_a_data_root(encoder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(200, 20, 20), (20, 20, 200)]):
        shape_image(color, "ellipse").save(images / f"{i}.png")
    listing = tmp_path / "lists" / "data.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([{"image_file": "0.png", "text": "a red circle"},
                                   {"image_file": "1.png", "text": ""}]))
    config = _config(listing, tmp_path / "out", encoder, data_root=images)
    records = IPAdapterMethod.load_records(config)
    assert [(r.path.name, r.caption, r.repeats) for r in records] == [("0.png", "a red circle", 1), ("1.png", "", 1)]
    result = train(config, tiny("sd1")[1])
    assert result.output.is_file() and len(result.losses) == 1


def test_bad_entries_and_unreadable_images_are_listed_before_training(encoder, tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    shape_image((200, 20, 20), "ellipse").save(root / "good.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shape_image((20, 200, 20), "ellipse", (32, 32)).save(root / "small.png")
    (root / "data.json").write_text(json.dumps([
        {"image_file": "good.png", "text": "ok"}, {"image_file": "broken.png", "text": "x"},
        {"image_file": "gone.png", "text": "x"}, {"image_file": "small.png", "text": "x"},
        {"image_file": "good.png"}, ["not", "an", "object"]]))
    model, backend = tiny("sd1")
    with pytest.raises(DatasetInvalidError) as caught:
        train(_config(root / "data.json", tmp_path / "out", encoder), backend)
    problems = [(p.path.name, p.kind) for p in caught.value.problems]
    assert problems == [("broken.png", ProblemKind.UNREADABLE_IMAGE), ("gone.png", ProblemKind.MISSING_IMAGE),
                        ("small.png", ProblemKind.TOO_SMALL), ("data.json", ProblemKind.MISSING_CAPTION),
                        ("data.json", ProblemKind.UNREADABLE_CAPTION)]
    message = str(caught.value)
    assert "broken.png: unreadable image" in message and "entry 4 (good.png) has no \"text\"" in message
    assert "gone.png: missing image (listed in data.json but not there)" in message
    assert not (tmp_path / "out").exists()  # nothing was trained or written

    folder = make_shapes_dataset(tmp_path / "folder", "1_shapes", count=2)
    (folder / "1_shapes" / "1.png").write_bytes(b"garbage")
    with pytest.raises(DatasetInvalidError, match=r"1_shapes/1.png: unreadable image"):
        train(_config(folder, tmp_path / "out2", encoder), backend)
    with pytest.raises(InputError, match="not readable JSON"):
        (root / "bad.json").write_text("[{")
        train(_config(root / "bad.json", tmp_path / "out3", encoder), backend)


def test_features_are_cached_per_encoder_and_file(encoder, tmp_path):
    folder = make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2) / "1_shapes"
    paths = sorted(folder.glob("*.png"))
    clip = load_clip_vision(encoder)
    for hidden in (False, True):
        fresh = ImageFeatures(clip, hidden).get(paths)
        cache = ImageFeatures(clip, hidden, tmp_path / f"cache{hidden}")
        assert torch.equal(cache.get(paths), fresh) and (cache.hits, cache.misses) == (0, 2)
        again = ImageFeatures(clip, hidden, tmp_path / f"cache{hidden}")
        assert torch.equal(again.get(paths), fresh) and (again.hits, again.misses) == (2, 0)
    assert fresh.shape == (2, 17, 96) and ImageFeatures(clip, False).get(paths).shape == (2, 64)
    cache = ImageFeatures(clip, True, tmp_path / "cacheTrue")
    shape_image((0, 0, 0), "rectangle").save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    other = ImageFeatures(load_clip_vision(save_clip_vision(tiny_clip_vision(seed=1), tmp_path / "c2")), True,
                          tmp_path / "cacheTrue")
    assert cache.key(paths[0]) != other.key(paths[0])  # another encoder, another key
    cache.get(paths)
    assert (cache.hits, cache.misses) == (1, 1)  # the changed image is encoded again
    zero = ImageFeatures(clip, False).empty()
    assert zero.shape == (64,) and not zero.any()  # the reference's uncond for plain: zero image_embeds
    image = np.zeros((40, 40, 3), np.uint8)
    panel_uncond = clip.encode_images([image], CropMode.CENTER, hidden_states=True)[1][0]
    assert torch.equal(ImageFeatures(clip, True).empty(), panel_uncond)  # plus: the panel's uncond, as the reference


def test_the_encoder_is_found_as_the_panel_finds_it(tmp_path):
    assert reference_encoder(IPProjection.PLAIN, BaseArch.SD1).width == 1024
    assert reference_encoder(IPProjection.PLAIN, BaseArch.SDXL).width == 1280
    assert reference_encoder(IPProjection.PLUS, BaseArch.SDXL).hidden_states
    with pytest.raises(InputError, match="needs a CLIP vision encoder: a ViT-H/14"):
        load_training_encoder(IPAdapterConfig(), reference_encoder(IPProjection.PLAIN, BaseArch.SD1))
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    with pytest.raises(MissingFileError, match="models/image_encoder/model.safetensors"):
        load_training_encoder(IPAdapterConfig(encoder_folders=(folder,)),
                              reference_encoder(IPProjection.PLUS, BaseArch.SD1))
    save_clip_vision(tiny_clip_vision(), folder, "any_name")
    found = load_training_encoder(IPAdapterConfig(encoder_folders=(folder,)), EncoderNeed(True, 96))
    assert found.shape.hidden_size == 96
    with pytest.raises(MissingFileError, match="does not exist"):
        load_training_encoder(IPAdapterConfig(image_encoder=tmp_path / "nope.safetensors"), EncoderNeed(True, 96))

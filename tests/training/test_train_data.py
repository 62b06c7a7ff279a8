"""The folder dataset: captions, repeats, validation that names every bad file, buckets, batch order, cache keys."""
from __future__ import annotations

import math
import os

import pytest
import torch
from train_helpers import make_shapes_dataset, shape_image

from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.training.buckets import BatchPlan, Bucket, assign_bucket, bucket_sizes, load_pixels, place
from lib_adapters.training.data import DatasetInvalidError, ProblemKind, load_records, scan_dataset, tag_frequency
from lib_adapters.training.latent_cache import CacheIdentity, LatentCache, cache_key


def test_captions_and_repeats(tmp_path):
    root = tmp_path / "ds"
    make_shapes_dataset(root, "3_shapes", count=2)
    (root / "3_shapes" / "1.txt").unlink()
    (root / "3_shapes" / "1.caption").write_text("\n  a blue square, flat  \nsecond line ignored\n")
    (root / "plain").mkdir()
    shape_image((0, 0, 0), "ellipse").save(root / "plain" / "x.jpg")
    (root / "plain" / "x.txt").write_text("a black circle")
    (root / "plain" / "x.caption").write_text("not used: .txt wins")
    (root / ".cache").mkdir()  # hidden folders are skipped, not reported as empty
    records = load_records(root)
    assert [(r.path.relative_to(root).as_posix(), r.caption, r.repeats, r.folder) for r in records] == [
        ("3_shapes/0.png", "a red circle", 3, "3_shapes"),
        ("3_shapes/1.png", "a blue square, flat", 3, "3_shapes"),
        ("plain/x.jpg", "a black circle", 1, "plain"),
    ]
    assert (records[0].width, records[0].height) == (64, 64)
    assert tag_frequency(records) == {"3_shapes": {"a red circle": 1, "a blue square": 1, "flat": 1},
                                      "plain": {"a black circle": 1}}


def test_validation_lists_every_bad_file_with_its_reason(tmp_path):
    root = tmp_path / "ds"
    good = root / "5_good"
    make_shapes_dataset(root, "5_good", count=1)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (good / "broken.txt").write_text("broken")
    shape_image((1, 2, 3), "ellipse").save(good / "nocaption.png")
    shape_image((1, 2, 3), "ellipse", (40, 100)).save(good / "small.png")
    (good / "small.txt").write_text("small")
    shape_image((1, 2, 3), "ellipse").save(good / "blank.png")
    (good / "blank.txt").write_text("  \n\n")
    (root / "2_empty").mkdir()
    (root / "2_empty" / "notes.txt").write_text("no images here")

    records, problems = scan_dataset(root, min_size=64)
    assert [r.path.name for r in records] == ["0.png"]  # the one good image is still read
    found = sorted((p.path.relative_to(root).as_posix(), p.kind) for p in problems)
    assert found == sorted([
        ("2_empty", ProblemKind.EMPTY_FOLDER),
        ("5_good/blank.txt", ProblemKind.EMPTY_CAPTION),
        ("5_good/broken.png", ProblemKind.UNREADABLE_IMAGE),
        ("5_good/nocaption.png", ProblemKind.MISSING_CAPTION),
        ("5_good/small.png", ProblemKind.TOO_SMALL),
    ])
    with pytest.raises(DatasetInvalidError) as info:
        load_records(root, min_size=64)
    assert isinstance(info.value, InputError) and len(info.value.problems) == 5
    message = str(info.value)
    for line in ("2_empty: empty folder", "5_good/broken.png: unreadable image", "5_good/nocaption.png: missing caption",
                 "5_good/small.png: image too small (40x100, the shorter side must be at least 64)",
                 "5_good/blank.txt: empty caption"):
        assert line in message
    assert scan_dataset(make_shapes_dataset(tmp_path / "ok"))[1] == []
    with pytest.raises(MissingFileError):
        load_records(tmp_path / "nowhere")


def test_bucket_sizes_for_512():
    buckets = bucket_sizes(512)
    assert Bucket(512, 512) in buckets and Bucket(256, 1024) in buckets and Bucket(1024, 256) in buckets
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in buckets)
    assert all(b.width * b.height <= 512 * 512 for b in buckets)
    assert all(256 <= min(b.width, b.height) and max(b.width, b.height) <= 1024 for b in buckets)
    assert len(set(b.aspect for b in buckets)) == len(buckets)  # no two buckets with the same shape
    assert buckets == bucket_sizes(512)  # deterministic
    # near-square pairs sit close to the full area: e.g. 576x448 = 98 % of 512^2
    assert Bucket(576, 448) in buckets and Bucket(448, 576) in buckets


def test_bucket_assignment_and_placement():
    buckets = bucket_sizes(512)
    assert assign_bucket(1000, 1000, buckets) == Bucket(512, 512)
    wide = assign_bucket(1600, 900, buckets)
    assert min(buckets, key=lambda b: abs(math.log(b.aspect) - math.log(16 / 9))) == wide == Bucket(640, 384)
    assert assign_bucket(900, 1600, buckets) == Bucket(384, 640)
    p = place(1600, 900, Bucket(640, 384))
    assert p.resized == (683, 384) and (p.crop_left, p.crop_top) == (21, 0)


def test_load_pixels_is_in_range_and_fitted(tmp_path):
    shape_image((255, 0, 0), "rectangle", (128, 96)).save(tmp_path / "a.png")
    pixels = load_pixels(tmp_path / "a.png", place(128, 96, Bucket(64, 64)))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert torch.equal(pixels[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]))  # the red square is in the middle


def test_batch_plan_is_deterministic_and_uses_repeats(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "3_a", count=2)
    make_shapes_dataset(root, "1_b", count=4, size=(128, 64))
    records = load_records(root)
    plan = BatchPlan(records, 128, batch_size=2, seed=5, buckets=True)
    assert plan.bucket_counts == {Bucket(128, 128): 6, Bucket(192, 64): 4}  # squares; 2:1 images to the 3:1 bucket
    epoch = plan.epoch(0)
    used = sorted(i for b in epoch for i in b.records)
    assert used == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5]  # 1_b (sorted first) once each, 3_a three times each
    assert all(len({plan.placements[i].bucket for i in b.records}) == 1 for b in epoch)  # one bucket per batch
    again = BatchPlan(records, 128, batch_size=2, seed=5, buckets=True)
    assert [b.records for b in again.epoch(0)] == [b.records for b in epoch]
    assert [b.records for b in plan.epoch(1)] != [b.records for b in epoch]
    other_seed = BatchPlan(records, 128, batch_size=2, seed=6, buckets=True)
    assert [b.records for b in other_seed.epoch(0)] != [b.records for b in epoch]
    square = BatchPlan(records, 128, batch_size=2, seed=5, buckets=False)
    assert {p.bucket for p in square.placements} == {Bucket(128, 128)}
    stream = plan.stream(0, 3)
    assert next(stream) == epoch[3]


def test_latent_cache_is_keyed_by_model_vae_and_file(tmp_path):
    image = tmp_path / "a.png"
    shape_image((255, 0, 0), "rectangle").save(image)
    placement = place(64, 64, Bucket(64, 64))
    identity = CacheIdentity("model-1", "vae-1")
    cache = LatentCache(identity, tmp_path / "cache")
    latent = torch.randn(4, 8, 8)
    cache.put(image, placement, latent)
    fresh = LatentCache(identity, tmp_path / "cache")  # a new run reads it from disk
    assert torch.equal(fresh.get(image, placement), latent) and fresh.hits == 1
    assert LatentCache(CacheIdentity("model-1", "vae-2"), tmp_path / "cache").get(image, placement) is None
    assert LatentCache(CacheIdentity("model-2", "vae-1"), tmp_path / "cache").get(image, placement) is None
    assert fresh.get(image, place(64, 64, Bucket(128, 64))) is None
    key = cache_key(identity, image, placement)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))  # the image was edited
    assert cache_key(identity, image, placement) != key
    assert LatentCache(identity, tmp_path / "cache").get(image, placement) is None
    # not .safetensors: the WebUI's Lora extension would list cache files in models/Lora as LoRAs
    assert {p.suffix for p in (tmp_path / "cache").iterdir()} == {".latent"}


def test_a_multi_megabyte_caption_is_capped_read_in_small_memory_and_warned_about_once(tmp_path, caplog):
    import logging
    import tracemalloc

    from train_helpers import tiny

    from lib_adapters.training.config import LoraConfig, TrainConfig
    from lib_adapters.training.data import CAPTION_MAX_CHARS
    from lib_adapters.training.loop import train

    root = make_shapes_dataset(tmp_path / "ds", "3_shapes", count=3)
    huge = root / "3_shapes" / "0.txt"
    huge.write_text("red, " * 1_000_000)  # 5 MB on one line, as in the real report
    (root / "3_shapes" / "1.txt").write_text("é" * 3_000_000 + "\nnot read")  # 6 MB of 2-byte characters
    tracemalloc.start()
    try:
        records = load_records(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # the files are 5-6 MB; only about 9 KB of each is read
    by_name = {r.path.name: r for r in records}
    assert by_name["0.png"].caption_capped and by_name["1.png"].caption_capped and not by_name["2.png"].caption_capped
    assert by_name["0.png"].caption.startswith("red, red") and len(by_name["0.png"].caption) <= CAPTION_MAX_CHARS
    assert not by_name["0.png"].caption.endswith((",", " "))  # cut at a tag boundary
    assert by_name["1.png"].caption == "é" * CAPTION_MAX_CHARS and by_name["2.png"].caption == "a green circle"
    assert len(tag_frequency(records)["3_shapes"]) == 3  # the metadata holds the capped captions, not 5 MB

    config = TrainConfig(root, tmp_path / "out", "capped", resolution=64, steps=3, batch_size=2,
                         lora=LoraConfig(rank=4, alpha=4))
    with caplog.at_level(logging.WARNING, logger="lib_adapters.training.loop"):
        train(config, tiny("sd1")[1])  # 3 images x 3 repeats over 3 steps of 2: each capped caption read repeatedly
    warnings = [r.getMessage() for r in caplog.records if "longer than the model reads" in r.getMessage()]
    assert sorted(w.split(" is longer")[0] for w in warnings) == [f"the caption in {huge}",
                                                                  f"the caption in {root / '3_shapes' / '1.txt'}"]
    assert f"only its first {CAPTION_MAX_CHARS} characters are used" in warnings[0]

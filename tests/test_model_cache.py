"""The model cache (memory budget, LRU, pinned models of the running generation) and the encoder-output
cache (keys, bounds, copies), without the WebUI."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lib_adapters.errors import MissingFileError
from lib_adapters.inference.cache import AdapterCache, FileKey, memory_bytes
from lib_adapters.inference.encodings import EncoderOutput, EncodingCache, EncodingKey, image_digest
from lib_adapters.models.clip_vision import CropMode

KB = 1024


def _module(kb: int) -> torch.nn.Module:
    """A module whose parameters take exactly ``kb`` KiB (fp32) and one small buffer."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(kb * KB // 4))
    return module


@pytest.fixture()
def files(tmp_path):
    paths = {}
    for name in "abcd":
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(b"x")
    return paths


def _loader(loads: list, kb: int = 100):
    def load(path):
        loads.append(path.stem)
        return _module(kb)
    return load


def _names(cache: AdapterCache) -> list[str]:
    return [Path(p).stem for p in cache.cached_paths()]


def _generation(cache: AdapterCache, files, names: str, loads: list, kb: int = 100) -> None:
    """One generation that uses the models ``names``, then ends."""
    for name in names:
        cache.get("adapter", files[name], _loader(loads, kb))
    cache.release()


def test_memory_bytes_counts_parameters_and_buffers_once():
    module = _module(8)
    module.register_buffer("table", torch.zeros(256, dtype=torch.float16))
    module.shared = module.weight  # the same storage again
    assert memory_bytes(module) == 8 * KB + 512


def test_models_of_one_generation_stay_for_the_next_within_the_budget(files):
    loads: list[str] = []
    cache = AdapterCache(budget_bytes=300 * KB)
    _generation(cache, files, "abc", loads)
    _generation(cache, files, "abc", loads)
    assert loads == ["a", "b", "c"] and cache.loads == 3
    assert cache.total_bytes == 300 * KB


def test_least_recently_used_goes_first_beyond_the_budget(files):
    loads: list[str] = []
    cache = AdapterCache(budget_bytes=250 * KB)  # room for two
    _generation(cache, files, "a", loads)
    _generation(cache, files, "b", loads)
    _generation(cache, files, "a", loads)  # a is now more recent than b
    _generation(cache, files, "c", loads)  # evicts b, the least recently used
    assert _names(cache) == ["a", "c"]
    _generation(cache, files, "b", loads)  # b is read again and evicts a
    assert loads == ["a", "b", "c", "b"]
    assert _names(cache) == ["c", "b"]


def test_models_in_use_are_never_evicted_until_the_generation_ends(files):
    loads: list[str] = []
    cache = AdapterCache(budget_bytes=150 * KB)  # room for one
    for name in "abc":
        cache.get("adapter", files[name], _loader(loads))
        # every model this generation loaded so far is still held, over the budget
        assert len(cache.cached_paths()) == "abc".index(name) + 1
    again = [cache.get("adapter", files[n], _loader(loads)) for n in "abc"]
    assert loads == ["a", "b", "c"] and all(isinstance(m, torch.nn.Module) for m in again)
    cache.release()
    assert _names(cache) == ["c"]  # trimmed after the generation: most recent kept


def test_zero_budget_keeps_nothing_between_generations(files):
    loads: list[str] = []
    cache = AdapterCache(budget_bytes=0)
    _generation(cache, files, "ab", loads)
    assert cache.cached_paths() == []
    _generation(cache, files, "a", loads)
    assert loads == ["a", "b", "a"]


def test_lowering_the_budget_trims_at_once(files):
    loads: list[str] = []
    cache = AdapterCache(budget_bytes=1000 * KB)
    _generation(cache, files, "abcd", loads)
    cache.set_budget(200 * KB)
    assert _names(cache) == ["c", "d"]


def test_a_replaced_file_is_read_again(files):
    loads: list[str] = []
    cache = AdapterCache()
    _generation(cache, files, "a", loads)
    files["a"].write_bytes(b"a new version")
    os.utime(files["a"], ns=(1, 1))
    _generation(cache, files, "a", loads)
    assert loads == ["a", "a"]


def test_a_removed_file_says_what_to_do(files):
    cache = AdapterCache()
    files["a"].unlink()
    with pytest.raises(MissingFileError, match="put it back or pick another model"):
        cache.get("adapter", files["a"], _loader([]))


def test_clear_drops_models_and_pins(files):
    loads: list[str] = []
    cache = AdapterCache()
    cache.get("adapter", files["a"], _loader(loads))
    cache.clear()
    assert cache.cached_paths() == [] and cache.total_bytes == 0
    _generation(cache, files, "a", loads)
    assert loads == ["a", "a"]


def _key(tmp_path, images=("x",), crop=CropMode.CENTER, output=EncoderOutput.PENULTIMATE) -> EncodingKey:
    path = tmp_path / "encoder.safetensors"
    if not path.exists():
        path.write_bytes(b"e")
    return EncodingKey(FileKey.of(path), tuple(images), crop, output)


def test_encodings_are_computed_once_per_key_and_handed_out_as_copies(tmp_path):
    cache = EncodingCache()
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(1, 3)

    first = cache.get(_key(tmp_path), compute)
    first.mul_(5)  # a caller altering its tensor must not alter the cache
    second = cache.get(_key(tmp_path), compute)
    assert len(calls) == 1 and torch.equal(second, torch.ones(1, 3)) and (cache.hits, cache.misses) == (1, 1)
    for other in (_key(tmp_path, crop=CropMode.SQUASH), _key(tmp_path, output=EncoderOutput.LAST_HIDDEN),
                  _key(tmp_path, images=("y",)), _key(tmp_path, images=("x", "x"))):
        cache.get(other, compute)
    assert len(calls) == 5


def test_encoding_cache_is_bounded_least_recently_used_out(tmp_path):
    cache = EncodingCache(max_items=2)
    calls = []
    for name in ("a", "b", "a", "c", "a", "b"):
        cache.get(_key(tmp_path, images=(name,)), lambda n=name: (calls.append(n), torch.zeros(1))[1])
    assert calls == ["a", "b", "c", "b"] and len(cache) == 2


def test_image_digest_tells_pixels_and_shapes_apart():
    image = np.zeros((4, 6, 3), np.uint8)
    other = image.copy()
    other[0, 0, 0] = 1
    assert image_digest(image) == image_digest(image.copy())
    assert image_digest(image) != image_digest(other)
    assert image_digest(image) != image_digest(image.reshape(6, 4, 3))
    assert image_digest(image[:, ::2]) == image_digest(np.ascontiguousarray(image[:, ::2]))

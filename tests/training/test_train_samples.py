"""Mid-run samples of adapter training show the adapter: a T2I-Adapter's samples get the features of a condition
image, an IP-Adapter's the tokens of a reference image (cond rows; "no image" on uncond rows), exactly as the
training step installs them; they change nothing in the run, and a bad sample image is refused up front."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_shapes_dataset, tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.errors import InputError, MissingFileError
from lib_adapters.training.backends.base import SizeCondition
from lib_adapters.training.buckets import Bucket, place
from lib_adapters.training.config import IPAdapterConfig, T2IConfig, TrainConfig
from lib_adapters.training.loop import train
from lib_adapters.training.methods.base import MethodBatch
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod
from lib_adapters.training.methods.t2i_adapter import T2IAdapterMethod
from lib_adapters.training.sampling import euler_sample_latents, euler_sampler, to_images

PROMPTS = ("a red circle", "a blue square")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_clip_vision(tiny_clip_vision(), tmp_path_factory.mktemp("clip"))


def _t2i_dataset(root: Path) -> Path:
    """Shapes with ready-made depth conditions (the image, inverted)."""
    make_shapes_dataset(root, "1_shapes", count=3)
    for i in range(3):
        with Image.open(root / "1_shapes" / f"{i}.png") as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(root / "1_shapes" / f"{i}.depth.png")
    return root


def _t2i_config(tmp_path: Path, out: str, **kw) -> TrainConfig:
    settings = dict(dataset_dir=tmp_path / "ds", method="t2i_adapter", resolution=64, steps=2, batch_size=2, learning_rate=1e-3, seed=1,
                    t2i=T2IConfig(condition="depth"), save_precision="fp32")
    settings.update(kw)
    return TrainConfig(output_dir=tmp_path / out, output_name="ad", **settings)


def _ip_config(tmp_path: Path, out: str, encoder: Path, **kw) -> TrainConfig:
    settings = dict(dataset_dir=tmp_path / "ds", method="ip_adapter", resolution=64, steps=2, batch_size=2, learning_rate=1e-3, seed=3,
                    ip=IPAdapterConfig(projection="plus", image_encoder=encoder, cache_features=False))
    settings.update(kw)
    return TrainConfig(output_dir=tmp_path / out, output_name="ip", **settings)


def _unet_inputs(backend, rows: int = 2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.full((rows,), 600)
    size = SizeCondition((64, 64), (0, 0), (64, 64))
    with torch.no_grad():
        cond = backend.encode_prompts(["a red circle"] * rows, [size] * rows)
    return x, t, cond


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_t2i_sample_conditioning_installs_what_the_training_step_installs(tmp_path, arch):
    _t2i_dataset(tmp_path / "ds")
    model, backend = tiny(arch)
    config = _t2i_config(tmp_path, "out")
    records = T2IAdapterMethod.load_records(config)
    method = T2IAdapterMethod.from_config(config, backend)
    conditioning = method.sample_conditioning(records, None, 64)
    assert conditioning.description == f"condition {records[0].condition.name}"

    square = place(records[0].width, records[0].height, Bucket(64, 64))
    batch = MethodBatch([records[0]] * 2, [square] * 2, torch.Generator(), backend.device)
    x, t, cond = _unet_inputs(backend)
    with torch.no_grad():
        base = backend.apply(x, t, cond)
        with method.unet_context(batch):
            trained = backend.apply(x, t, cond)
        # both halves of CFG get the features (the panel's balanced mode, diffusers' adapter pipeline)
        for uncond in (False, True):
            with conditioning.around(uncond, 2):
                sampled = backend.apply(x, t, cond)
            assert torch.allclose(sampled, trained, atol=1e-5, rtol=0)  # (one condition vs a batch of two: fp32 noise)
        after = backend.apply(x, t, cond)
        other = method.sample_conditioning(records, records[1].condition, 64)
        with other.around(False, 2):
            elsewhere = backend.apply(x, t, cond)
    assert (trained - base).abs().mean() > 1e-3  # the adapter acts
    assert (elsewhere - trained).abs().mean() > 1e-4  # another condition image, other features
    assert other.description == f"condition {records[1].condition.name}"
    assert torch.equal(after, base)  # nothing left installed


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_ip_sample_conditioning_gives_image_tokens_to_cond_rows_and_no_image_to_uncond_rows(tmp_path, encoder, arch):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    model, backend = tiny(arch)
    config = _ip_config(tmp_path, "out", encoder)
    records = IPAdapterMethod.load_records(config)
    method = IPAdapterMethod.from_config(config, backend)
    try:
        conditioning = method.sample_conditioning(records, None, 64)
        assert conditioning.description == f"reference {records[0].path.name}"
        x, t, cond = _unet_inputs(backend)
        with torch.no_grad():
            image = method.image_tokens(method.features.get([records[0].path]))
            empty = method.image_tokens(method.features.empty()[None])
            expected = {}
            for uncond, tokens in ((False, image), (True, empty)):
                with method.tokens_active(tokens.expand(2, -1, -1)):
                    expected[uncond] = backend.apply(x, t, cond)
            for uncond in (False, True):
                with conditioning.around(uncond, 2):
                    assert torch.allclose(backend.apply(x, t, cond), expected[uncond], atol=1e-6, rtol=0)
            assert method.unit.tokens is None  # the plain UNet again after each call
            assert (expected[False] - expected[True]).abs().mean() > 1e-4
    finally:
        method.close()


def _capturing(seen: list):
    """A sampler that keeps each request's latents and the same request's latents without the conditioning."""
    def sample(backend, request):
        with torch.random.fork_rng():
            latents = euler_sample_latents(backend, request)
            plain = euler_sample_latents(backend, replace(request, conditioning=None))
        seen.append((request.conditioning.description, latents, plain))
        return to_images(backend.decode_latents(latents))
    return sample


def test_t2i_run_samples_show_the_adapter_and_leave_training_unchanged(tmp_path):
    _t2i_dataset(tmp_path / "ds")
    sampled = _t2i_config(tmp_path, "s", sample_every=1, sample_prompts=PROMPTS, sample_steps=3)
    with_samples = train(sampled, tiny("sd1")[1])  # the default sampler
    without = train(_t2i_config(tmp_path, "n"), tiny("sd1")[1])
    assert with_samples.losses == without.losses
    assert sorted(p.name for p in (tmp_path / "s" / "ad-samples").iterdir()) == [
        "step000001-0.png", "step000001-1.png", "step000002-0.png", "step000002-1.png"]

    seen: list = []
    other = tmp_path / "ds" / "1_shapes" / "2.depth.png"
    for name, image in (("c1", None), ("c2", other)):
        train(replace(sampled, output_dir=tmp_path / name, steps=1, sample_image=image), tiny("sd1")[1],
              sampler=_capturing(seen))
    (first, latents, plain), (second, latents_other, plain_other) = seen
    assert first == "condition 0.depth.png" and second == "condition 2.depth.png"
    assert torch.equal(plain, plain_other)  # same weights after step 1, same seed
    assert (latents - plain).abs().mean() > 1e-3 and (latents_other - latents).abs().mean() > 1e-4


def test_ip_run_samples_show_the_reference(tmp_path, encoder):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    seen: list = []
    reference = tmp_path / "ds" / "1_shapes" / "1.png"
    result = train(_ip_config(tmp_path, "s", encoder, steps=1, sample_every=1, sample_prompts=PROMPTS,
                              sample_steps=3, sample_image=reference), tiny("sd1")[1], sampler=_capturing(seen))
    without = train(_ip_config(tmp_path, "n", encoder, steps=1), tiny("sd1")[1])
    assert result.losses == without.losses
    (description, latents, plain), = seen
    assert description == "reference 1.png" and (latents - plain).abs().mean() > 1e-4


def test_t2i_samples_under_bf16_autocast(tmp_path):
    _t2i_dataset(tmp_path / "ds")
    images = []
    sampler = lambda backend, request: images.extend(euler_sampler(backend, request)) or images  # noqa: E731
    train(_t2i_config(tmp_path, "bf16", steps=1, precision="bf16", sample_every=1, sample_prompts=PROMPTS[:1],
                      sample_steps=2), tiny("sd1")[1], sampler=sampler)
    assert len(images) == 1 and np.asarray(images[0]).std() > 0


def test_a_bad_sample_image_is_refused_before_training(tmp_path, encoder):
    _t2i_dataset(tmp_path / "ds")
    make_shapes_dataset(tmp_path / "ip", "1_shapes", count=2)
    with pytest.raises(InputError, match="LoRA samples take none"):
        TrainConfig(tmp_path / "ds", tmp_path / "o", "l", sample_image=tmp_path / "ds" / "1_shapes" / "0.png")
    missing = tmp_path / "nope.png"
    with pytest.raises(MissingFileError, match=f"the sample image {missing} does not exist"):
        train(_t2i_config(tmp_path, "m", sample_image=missing), tiny("sd1")[1])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(InputError, match="is not an image PIL can read"):
        train(_ip_config(tmp_path, "b", encoder, sample_image=broken, dataset_dir=tmp_path / "ip"), tiny("sd1")[1])
    assert not (tmp_path / "m").exists() and not (tmp_path / "b").exists()

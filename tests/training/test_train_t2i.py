"""T2I-Adapter training: short runs through both backends, files that reload in our loader and in diffusers'
``T2IAdapter``, identical injection in ldm and diffusers UNets, the dataset checks, condition generation and
caching, exact resume, and the base UNet restored bit for bit."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_shapes_dataset, tiny

from lib_adapters.errors import IncompatibleModelError, MissingFileError
from lib_adapters.formats.reader import read_safetensors_metadata, read_state_dict
from lib_adapters.formats.t2i import load_t2i_adapter, tencentarc_to_diffusers
from lib_adapters.training.buckets import Bucket, load_pixels, place
from lib_adapters.training.run_checkpoints import checkpoint_paths
from lib_adapters.training.t2i_data import CACHE_FOLDER, load_condition, load_t2i_records
from lib_adapters.training.config import T2IConfig, TrainConfig
from lib_adapters.training.data import DatasetInvalidError, ProblemKind
from lib_adapters.training.loop import train
from lib_adapters.training.progress import TrainCallbacks
from lib_adapters.training.methods.t2i_adapter import T2IAdapterMethod, cubic_timesteps, inject_features

FULL1 = T2IConfig(condition="canny", condition_channels=1, preprocessor="canny")


def _dataset(root, count=4, condition="canny"):
    """Shapes with ready-made conditions (the image, inverted) as ``x.<condition>.png``."""
    make_shapes_dataset(root, "2_shapes", count=count)
    for i in range(count):
        with Image.open(root / "2_shapes" / f"{i}.png") as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(root / "2_shapes" / f"{i}.{condition}.png")
    return root


def _config(tmp_path, name, t2i=FULL1, **kw):
    settings = dict(dataset_dir=tmp_path / "ds", output_dir=tmp_path / name, output_name="ad", method="t2i_adapter",
                    resolution=64, steps=3, batch_size=2, learning_rate=1e-3, t2i=t2i)
    settings.update(kw)
    return TrainConfig(**settings)


def _unet_snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}, [p.requires_grad for p in unet.parameters()]


def _assert_restored(unet, snapshot):
    state, flags = snapshot
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert not any("forward" in m.__dict__ for m in unet.modules()), "a wrapper was left on the UNet"


@pytest.mark.parametrize("arch,kind", [("sd1", "full"), ("sd1", "light"), ("sdxl", "full"), ("sdxl", "light")])
def test_short_run_on_the_ldm_backend_exports_a_file_our_loader_reads(tmp_path, arch, kind):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")  # no conditions: the canny preprocessor makes them
    model, backend = tiny(arch)
    before = _unet_snapshot(model.model.diffusion_model)
    t2i = T2IConfig(adapter_kind=kind, condition="canny", condition_channels=1, preprocessor="canny")
    result = train(_config(tmp_path, "out", t2i), backend)
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    _assert_restored(model.model.diffusion_model, before)

    loaded = load_t2i_adapter(result.output)
    cfg = loaded.config
    assert (cfg.kind.value, cfg.sdxl, cfg.image_channels, cfg.channels) == (kind, arch == "sdxl", 1, (32, 64, 128, 128))
    assert cfg.num_res_blocks == (4 if kind == "light" else 2) and cfg.unshuffle == (16 if arch == "sdxl" else 8)
    tensors = read_state_dict(result.output)
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # the default save precision
    assert not any(k.startswith("adapter.") for k in tensors)  # TencentARC layout
    final = read_state_dict(checkpoint_paths(_config(tmp_path, "out"), 3)[0])  # the fp32 checkpoint of the same step
    assert all(torch.equal(tensors[k], final[k].half()) for k in tensors)
    meta = read_safetensors_metadata(result.output)
    assert meta["t2i_adapter.condition"] == "canny" and meta["t2i_adapter.steps"] == "3"
    assert meta["modelspec.architecture"].endswith("/t2i-adapter")
    made = _config(tmp_path, "out").cache_dir / CACHE_FOLDER / "canny" / "2_shapes"
    assert made.parent.parent.parent.parent == tmp_path / "out" / "cache"  # under the output folder
    assert len(list(made.glob("*.canny.png"))) == 4 and not (tmp_path / "ds" / ".t2i-conditions").exists()


def _features(adapter_module, condition):
    with torch.no_grad():
        return adapter_module(condition)


@pytest.mark.parametrize("layout", ["tencentarc", "diffusers"])
@pytest.mark.parametrize("arch,kind", [("sd1", "full"), ("sd1", "light"), ("sdxl", "full")])
def test_exported_file_loads_into_diffusers_t2iadapter_with_the_same_features(tmp_path, arch, kind, layout):
    diffusers = pytest.importorskip("diffusers")
    _dataset(tmp_path / "ds", count=2, condition="depth")
    t2i = T2IConfig(adapter_kind=kind, condition="depth", export_layout=layout)
    result = train(_config(tmp_path, "out", t2i, steps=2, learning_rate=1e-2, save_precision="fp32"), tiny(arch)[1])
    ours = load_t2i_adapter(result.output)
    meta = read_safetensors_metadata(result.output)
    state = read_state_dict(result.output)
    if layout == "tencentarc":
        state = tencentarc_to_diffusers(state, ours.config)
    else:
        assert all(k.startswith("adapter.") for k in state)
    reference = diffusers.T2IAdapter(**json.loads(meta["t2i_adapter.diffusers_config"]))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(_features(ours.module, condition), _features(reference.eval(), condition)):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_diffusers_backend_trains_and_injects_exactly_as_the_ldm_backend(tmp_path):
    pytest.importorskip("diffusers")
    from test_train_diffusers import _pair

    for arch in ("sd1", "sdxl"):
        model, ldm, dif = _pair(arch)
        adapter = load_t2i_adapter(_trained_file(tmp_path / arch, ldm)).module
        features = _features(adapter, torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([10, 700])
        with torch.no_grad():
            plain = ldm.apply(x, t, ldm.encode_prompts(["a", "b"]))
            with inject_features(ldm.unet, features):
                via_ldm = ldm.apply(x, t, ldm.encode_prompts(["a", "b"]))
            with inject_features(dif.unet, features):
                via_diffusers = dif.apply(x, t, dif.encode_prompts(["a", "b"]))
        assert (via_ldm - plain).abs().max() > 1e-3, "the features must change the prediction"
        assert torch.allclose(via_ldm, via_diffusers, atol=1e-4, rtol=1e-4), arch

        before = _unet_snapshot(dif.unet)
        result = train(_config(tmp_path / arch, "dif", save_precision="fp32"), dif)
        assert len(result.losses) == 3 and np.isfinite(result.losses).all()
        _assert_restored(dif.unet, before)
        assert load_t2i_adapter(result.output).config.sdxl == (arch == "sdxl")


def _trained_file(tmp_path, backend):
    _dataset(tmp_path / "ds", count=2)
    return train(_config(tmp_path, "ldm", steps=2, learning_rate=1e-2, save_precision="fp32"), backend).output


class _Stop(TrainCallbacks):
    def __init__(self, at):
        self.at, self.seen = at, 0

    def on_progress(self, progress):
        self.seen = progress.step

    def interrupted(self):
        return self.seen >= self.at


def test_interrupt_and_resume_equal_an_uninterrupted_run_bit_for_bit(tmp_path):
    _dataset(tmp_path / "ds", count=3)
    t2i = T2IConfig(condition="canny", condition_channels=1, timesteps="cubic")
    settings = dict(steps=6, grad_accumulation=2, lr_schedule="cosine", noise_offset=0.05, save_precision="fp32")
    straight = train(_config(tmp_path, "a", t2i, **settings), tiny("sd1")[1])
    first = train(_config(tmp_path, "b", t2i, **settings), tiny("sd1")[1], callbacks=_Stop(3))
    assert first.interrupted and first.step == 3
    second = train(_config(tmp_path, "b", t2i, **settings), tiny("sd1")[1],
                   resume_from=checkpoint_paths(_config(tmp_path, "b"), 3)[1])
    assert first.losses + second.losses == straight.losses
    a, b = read_state_dict(straight.output), read_state_dict(second.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_can_start_from_an_existing_adapter_file(tmp_path):
    _dataset(tmp_path / "ds", count=2)
    start = _trained_file(tmp_path / "first", tiny("sd1")[1])
    t2i = T2IConfig(condition="canny", condition_channels=3, init_from=start, adapter_kind="light")  # the file decides
    method = T2IAdapterMethod(tiny("sd1")[1], t2i)
    file_state = read_state_dict(start)
    assert method.adapter_config == load_t2i_adapter(start).config
    assert all(torch.equal(v, file_state[k].float()) for k, v in method.trainable_state().items())
    assert all(p.requires_grad for p in method.adapter.parameters())

    xl = T2IConfig(condition="canny", condition_channels=1, init_from=start)
    with pytest.raises(IncompatibleModelError, match="SD1.x/SD2.x T2I-Adapter but the model is SDXL"):
        train(_config(tmp_path, "third", xl), tiny("sdxl")[1])


def test_dataset_problems_are_listed_file_by_file_before_training(tmp_path):
    root = _dataset(tmp_path / "ds", count=4)
    os.remove(root / "2_shapes" / "1.canny.png")
    (root / "2_shapes" / "2.png").write_bytes(b"not a png")
    (root / "2_shapes" / "3.canny.png").write_bytes(b"broken")
    model, backend = tiny("sd1")
    calls = []
    model.model.diffusion_model.register_forward_hook(lambda *a: calls.append(1))
    no_preprocessor = T2IConfig(condition="canny", condition_channels=1)
    with pytest.raises(DatasetInvalidError) as info:
        train(_config(tmp_path, "out", no_preprocessor), backend)
    found = {(p.path.name, p.kind) for p in info.value.problems}
    assert found == {("1.png", ProblemKind.MISSING_CONDITION), ("2.png", ProblemKind.UNREADABLE_IMAGE),
                     ("3.canny.png", ProblemKind.UNREADABLE_CONDITION)}
    message = str(info.value)
    assert "1.png: missing condition (no 1.canny.png next to it" in message and "3.canny.png" in message
    assert calls == [] and not (tmp_path / "out").exists()


def test_missing_conditions_are_made_once_and_weights_needing_preprocessors_say_what_is_missing(tmp_path):
    root = _dataset(tmp_path / "ds", count=3)
    os.remove(root / "2_shapes" / "0.canny.png")
    config = _config(tmp_path, "out")
    records = load_t2i_records(config)
    made = config.cache_dir / CACHE_FOLDER / "canny" / "2_shapes" / "0.canny.png"
    folder = root / "2_shapes"
    assert [r.condition for r in records] == [made, folder / "1.canny.png", folder / "2.canny.png"]
    assert Image.open(made).size == (64, 64)
    stamp = made.stat().st_mtime_ns
    load_t2i_records(config)
    assert made.stat().st_mtime_ns == stamp  # cached, not made again

    os.remove(root / "2_shapes" / "1.canny.png")
    depth = T2IConfig(condition="canny", preprocessor="depth_midas", preprocessor_weights_dir=tmp_path / "none")
    with pytest.raises(MissingFileError):
        load_t2i_records(_config(tmp_path, "out", depth))


def test_the_tencentarc_meta_file_layout(tmp_path):
    root = _dataset(tmp_path / "data", count=3, condition="depth")
    meta = tmp_path / "data" / "meta.txt"
    meta.write_text("2_shapes/2.png\n\n2_shapes/0.png\n2_shapes/9.png\n")
    with pytest.raises(DatasetInvalidError) as info:
        load_t2i_records(_config(tmp_path, "out", T2IConfig(), dataset_dir=meta))
    assert [(p.path.name, p.kind) for p in info.value.problems] == [("9.png", ProblemKind.MISSING_IMAGE)]
    meta.write_text(f"2_shapes/2.png\n{root / '2_shapes' / '0.png'}\n")
    records = load_t2i_records(_config(tmp_path, "out", T2IConfig(), dataset_dir=meta))
    assert [(r.path.name, r.condition.name, r.caption) for r in records] == [
        ("2.png", "2.depth.png", "a green circle"), ("0.png", "0.depth.png", "a red circle")]


def test_a_condition_gets_exactly_its_images_resize_and_crop(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    image.save(tmp_path / "x.png")
    image.resize((320, 180)).save(tmp_path / "x.depth.png")  # twice the size: resized to the image's first
    placement = place(160, 90, Bucket(128, 64))
    pixels = load_pixels(tmp_path / "x.png", placement)
    same = load_condition(tmp_path / "x.png", placement, 3)
    assert torch.allclose(same * 2 - 1, pixels, atol=1e-6)
    bigger = load_condition(tmp_path / "x.depth.png", placement, 3)
    assert bigger.shape == (3, 64, 128) and (bigger * 2 - 1 - pixels).abs().mean() < 0.1
    assert load_condition(tmp_path / "x.png", placement, 1).shape == (1, 64, 128)


def test_cubic_timesteps_favour_high_noise():
    t = cubic_timesteps(20000, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    assert abs(t.float().mean().item() - 749.5) < 5  # E[(1 - u^3) T] = 3T/4
    assert (t >= 500).float().mean().item() == pytest.approx(0.794, abs=0.01)  # P(u^3 <= 1/2)

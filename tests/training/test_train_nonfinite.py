"""A non-finite loss names the input that was not finite, with advice that fits it: a caption's conditioning
(a text encoder that yields NaN for one word), an image's latents (a VAE that yields NaN for one image), the
method's own features (T2I-Adapter features, IP-Adapter CLIP features), and only when every input was finite
the learning-rate/precision advice (a genuinely diverging update)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_shapes_dataset, poison_black_images, poison_word, tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.training import nonfinite
from lib_adapters.training.config import IPAdapterConfig, LoraConfig, T2IConfig, TrainConfig
from lib_adapters.training.errors import NonFiniteLossError
from lib_adapters.training.ip_data import ImageFeatures
from lib_adapters.training import loop
from lib_adapters.training.loop import train
from lib_adapters.training.progress import TrainCallbacks
from lib_adapters.training.methods.t2i_adapter import T2IAdapterMethod
from lib_adapters.training.nonfinite import InputSource

LR_ADVICE = "a lower learning rate"


def _config(tmp_path: Path, **kwargs) -> TrainConfig:
    settings = dict(resolution=64, steps=4, batch_size=2, learning_rate=1e-3, seed=5, lora=LoraConfig(rank=4, alpha=4))
    settings.update(kwargs)
    return TrainConfig(tmp_path / "ds", tmp_path / "out", "nan", **settings)


def _fail(config, backend) -> NonFiniteLossError:
    with pytest.raises(NonFiniteLossError) as info:
        train(config, backend)
    return info.value


def test_a_caption_whose_conditioning_is_nan_is_named_with_its_file(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes")
    model, backend = tiny("sd1")
    poison_word(model.cond_stage_model, "yellow")  # "a yellow square" in 1_shapes/3.txt
    error = _fail(_config(tmp_path), backend)
    assert [i.source for i in error.inputs] == [InputSource.CAPTION]
    assert error.inputs[0].files == (tmp_path / "ds" / "1_shapes" / "3.txt",)
    message = str(error)
    assert "the text conditioning of caption 'a yellow square' (1_shapes/3.txt) is NaN" in message, message
    assert "neither the learning rate nor the precision is the cause" in message
    assert LR_ADVICE not in message and "red circle" not in message


def test_an_image_whose_latents_are_nan_is_named(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=3)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "ds" / "1_shapes" / "night.png")
    (tmp_path / "ds" / "1_shapes" / "night.txt").write_text("a black night")
    model, backend = tiny("sd1")
    poison_black_images(model)
    error = _fail(_config(tmp_path), backend)
    assert [i.source for i in error.inputs] == [InputSource.LATENTS]
    message = str(error)
    assert "the latents of 1_shapes/night.png (the VAE's encoding) are NaN" in message, message
    assert "--no-half-vae" in message and LR_ADVICE not in message


def test_t2i_adapter_features_that_become_nan_are_named_with_their_condition(tmp_path, monkeypatch):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    for i in range(2):
        with Image.open(tmp_path / "ds" / "1_shapes" / f"{i}.png") as im:
            Image.fromarray(255 - np.asarray(im.convert("L"))).save(tmp_path / "ds" / "1_shapes" / f"{i}.sketch.png")
    built = []
    monkeypatch.setattr(T2IAdapterMethod, "from_config",
                        classmethod(lambda cls, config, backend: built.append(cls(backend, config.t2i)) or built[-1]))

    class BreakAfterStep2(TrainCallbacks):  # an update that made the adapter's weights NaN
        def on_progress(self, progress):
            if progress.step == 2:
                with torch.no_grad():
                    next(built[0].adapter.parameters()).fill_(float("nan"))

    config = _config(tmp_path, method="t2i_adapter", batch_size=1,
                     t2i=T2IConfig(condition="sketch", condition_channels=1))
    _, backend = tiny("sd1")
    with pytest.raises(NonFiniteLossError) as info:
        train(config, backend, callbacks=BreakAfterStep2())
    error = info.value
    assert error.step == 3 and [i.source for i in error.inputs] == [InputSource.FEATURES]
    message = str(error)
    assert "the T2I-Adapter's features of the condition 1_shapes/0.sketch.png are NaN" in message, message
    assert "the T2I-Adapter's weights became NaN/inf in training: lower the learning rate" in message


def test_ip_adapter_clip_features_that_are_nan_are_named_with_the_encoder(tmp_path, monkeypatch):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    encoder = save_clip_vision(tiny_clip_vision(), tmp_path / "clip")
    get = ImageFeatures.get

    def nan_for_one_image(self, paths):  # an encoder that gives NaN for 1.png
        features = get(self, paths).clone()
        features[[i for i, p in enumerate(paths) if p.name == "1.png"]] = float("nan")
        return features

    monkeypatch.setattr(ImageFeatures, "get", nan_for_one_image)
    config = _config(tmp_path, method="ip_adapter", ip=IPAdapterConfig(image_encoder=encoder, cache_features=False,
                                                                       image_drop=0, text_drop=0, both_drop=0),
                     buckets=False, lora=LoraConfig())
    error = _fail(config, tiny("sd1")[1])
    assert [i.source for i in error.inputs] == [InputSource.FEATURES]
    message = str(error)
    assert "the CLIP image features of 1_shapes/1.png (encoder " in message and "are NaN" in message, message
    assert "check the encoder file (ip_image_encoder)" in message and LR_ADVICE not in message


def test_a_diverging_update_with_finite_inputs_gets_the_learning_rate_advice(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    config = _config(tmp_path, steps=40, batch_size=1, learning_rate=1.0, max_grad_norm=None, weight_decay=0.0,
                     lora=LoraConfig(rank=4, alpha=4.0, targets="attention+ff+conv"))
    error = _fail(config, tiny("sd1")[1])
    assert error.inputs == () and error.updated and error.step > 1
    message = str(error)
    assert "every input of the step was finite, so the training diverged" in message
    assert f"{LR_ADVICE} (this run used 1)" in message and "bf16" in message


def test_the_inputs_are_not_looked_at_while_the_loss_is_finite(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "diagnose", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr(nonfinite, "bad_rows", lambda t: calls.append(1) or [])
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    result = train(_config(tmp_path, steps=3), tiny("sd1")[1])
    assert len(result.losses) == 3 and not calls

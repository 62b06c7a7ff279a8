"""The loop: it learns, resumes bit for bit, stops on a non-finite loss without touching the last checkpoint,
saves on interrupt, samples without disturbing training, and trains SDXL's text encoders under bf16 autocast."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_shapes_dataset, tiny

from lib_adapters.errors import AdapterError, InputError
from lib_adapters.training.run_checkpoints import checkpoint_paths, latest_checkpoint
from lib_adapters.training.config import LoraConfig, TrainConfig
from lib_adapters.training.errors import NonFiniteLossError, TrainingError
from lib_adapters.training.loop import train
from lib_adapters.training.progress import TrainCallbacks
from lib_adapters.training.methods.lora_file import load_lora


def _config(tmp_path: Path, out: str, **kwargs) -> TrainConfig:
    defaults = dict(resolution=64, steps=6, batch_size=2, learning_rate=1e-3, seed=7,
                    lora=LoraConfig(rank=4, alpha=4.0))
    defaults.update(kwargs)
    return TrainConfig(tmp_path / "ds", tmp_path / out, "tiny", **defaults)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loss_falls_on_a_small_dataset(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    _, backend = tiny("sd1")
    config = _config(tmp_path, "out", steps=150, batch_size=1, learning_rate=5e-3, seed=1, cache_latents=True)
    result = train(config, backend)
    losses = np.array(result.losses)
    assert len(losses) == 150 and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.8 * first, (first, last)
    tensors, metadata = load_lora(result.output)
    assert result.output == tmp_path / "out" / "tiny.safetensors" and metadata["ss_steps"] == "150"
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"].dtype == torch.float16
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
    # kohya counts images with their repeats: 4 images in 2_shapes
    assert metadata["ss_num_train_images"] == "8" and "a red circle" in metadata["ss_tag_frequency"]


class _StopAt(TrainCallbacks):
    def __init__(self, step: int):
        self.step, self.seen = step, 0
        self.checkpoints: dict[int, str] = {}

    def on_progress(self, progress) -> None:
        self.seen = progress.step

    def interrupted(self) -> bool:
        return self.seen >= self.step

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints[step] = _sha(path.with_suffix(".safetensors")) + _sha(path)


def test_interrupt_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "2_shapes", count=3)  # 6 images a epoch, 3 batches of 2: epochs wrap mid-step
    settings = dict(grad_accumulation=2, lr_schedule="cosine", warmup_steps=2, noise_offset=0.05, min_snr_gamma=5.0)
    straight = train(_config(tmp_path, "a", **settings), tiny("sd1")[1])
    assert not straight.interrupted and len(straight.losses) == 6

    stopper = _StopAt(3)
    first = train(_config(tmp_path, "b", **settings), tiny("sd1")[1], callbacks=stopper)
    assert first.interrupted and first.output is None and first.step == 3
    state = checkpoint_paths(_config(tmp_path, "b"), 3)[1]
    assert first.checkpoints == [state] and latest_checkpoint(_config(tmp_path, "b")) == state
    second = train(_config(tmp_path, "b", **settings), tiny("sd1")[1], resume_from=state)
    assert second.step == 6 and not second.interrupted

    assert first.losses + second.losses == straight.losses  # the same numbers, step by step
    for out in ("tiny-checkpoints/tiny-step000006.safetensors", "tiny.safetensors"):
        a, _ = load_lora(tmp_path / "a" / out)
        b, _ = load_lora(tmp_path / "b" / out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), out

    # an error in the middle of step 4 (Ctrl+C during the first of its two batches) saves step 3's boundary
    model, backend = tiny("sd1")
    calls = {"n": 0}

    def stop_mid_step(module, args, output):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return output

    handle = model.model.diffusion_model.register_forward_hook(stop_mid_step)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "c", **settings), backend)
    handle.remove()
    assert latest_checkpoint(_config(tmp_path, "c")) == checkpoint_paths(_config(tmp_path, "c"), 3)[1]
    third = train(_config(tmp_path, "c", **settings), tiny("sd1")[1],
                  resume_from=latest_checkpoint(_config(tmp_path, "c")))
    assert third.losses == straight.losses[3:]
    c, _ = load_lora(tmp_path / "c" / "tiny.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(InputError, match="lora_rank: 4 -> 8"):
        train(_config(tmp_path, "b", **settings, lora=LoraConfig(rank=8, alpha=4.0)), tiny("sd1")[1], resume_from=state)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    model, backend = tiny("sd1")
    calls = {"n": 0}

    def poison(module, args, output):  # the 5th UNet call (step 5) returns NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    handle = model.model.diffusion_model.register_forward_hook(poison)
    watcher = _StopAt(10**9)
    config = _config(tmp_path, "out", steps=6, batch_size=1, save_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, backend, callbacks=watcher)
    handle.remove()
    error = info.value
    assert isinstance(error, TrainingError) and isinstance(error, AdapterError)
    assert error.step == 5 and error.last_checkpoint == checkpoint_paths(config, 4)[1]
    message = str(error)
    assert "bf16" in message and "lower learning rate" in message and "step 5" in message
    assert sorted(watcher.checkpoints) == [2, 4]
    weights, state = checkpoint_paths(config, 4)
    assert _sha(weights) + _sha(state) == watcher.checkpoints[4]  # untouched since it was written
    assert not checkpoint_paths(config, 5)[1].exists() and not checkpoint_paths(config, 6)[1].exists()
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    assert not model.model.diffusion_model._forward_hooks  # LoRA hooks removed even though the run failed
    assert any(p.requires_grad for p in model.model.diffusion_model.parameters())  # base flags restored


def test_samples_are_saved_and_do_not_change_training(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    seen = []

    class Collect(TrainCallbacks):
        def on_sample(self, step, images, paths):
            seen.append((step, [im.size for im in images], [p.name for p in paths]))

    sampled = _config(tmp_path, "s", steps=2, sample_every=1, sample_prompts=("a red circle", "a blue square"),
                      sample_steps=3, sample_seed=5)
    with_samples = train(sampled, tiny("sd1")[1], callbacks=Collect())
    without = train(_config(tmp_path, "n", steps=2), tiny("sd1")[1])
    assert seen == [(1, [(64, 64)] * 2, ["step000001-0.png", "step000001-1.png"]),
                    (2, [(64, 64)] * 2, ["step000002-0.png", "step000002-1.png"])]
    assert (tmp_path / "s" / "tiny-samples" / "step000002-1.png").is_file()
    assert with_samples.losses == without.losses
    a, _ = load_lora(with_samples.output)
    b, _ = load_lora(without.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(_config(tmp_path, "s2", steps=1, sample_every=1, sample_prompts=("a red circle", "a blue square"),
                          sample_steps=3, sample_seed=5), tiny("sd1")[1])
    for i in range(2):  # fixed prompts and seed, same weights after step 1: the same previews, pixel for pixel
        first = np.asarray(Image.open(tmp_path / "s" / "tiny-samples" / f"step000001-{i}.png"))
        second = np.asarray(Image.open(tmp_path / "s2" / "tiny-samples" / f"step000001-{i}.png"))
        assert again.step == 1 and np.array_equal(first, second)


def test_sdxl_text_encoder_lora_trains_under_bf16_autocast(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    _, backend = tiny("sdxl")
    config = _config(tmp_path, "xl", steps=2, precision="bf16", gradient_checkpointing=True, learning_rate=1e-2,
                     lora=LoraConfig(rank=4, alpha=4.0, train_text_encoder=True))
    result = train(config, backend)
    assert all(np.isfinite(result.losses))
    tensors, metadata = load_lora(checkpoint_paths(config, 2)[0])
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # trainable weights stay fp32 under autocast
    trained = {k[: -len(".lora_up.weight")]: bool(t.abs().sum() > 0) for k, t in tensors.items() if k.endswith("lora_up.weight")}
    assert all(v for k, v in trained.items() if k.startswith("lora_unet_"))  # gradients reached every UNet LoRA
    for te in ("lora_te1", "lora_te2"):  # and the text encoders' layers that shape the penultimate hidden state;
        assert all(v for k, v in trained.items() if k.startswith(f"{te}_text_model_encoder_layers_0_"))
        # the last layer only feeds the pooled vector, which the stub's ldm UNet ignores (real SDXL uses it as y)
        assert not any(v for k, v in trained.items() if k.startswith(f"{te}_text_model_encoder_layers_1_self_attn"))
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_mixed_precision"] == "bf16"


def test_fp16_needs_a_gpu(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=1)
    with pytest.raises(InputError, match="fp16 mixed precision needs a CUDA GPU"):
        train(_config(tmp_path, "f", precision="fp16"), tiny("sd1")[1])


def test_checkpoints_resume_under_the_webui_safe_unpickler(tmp_path, monkeypatch):
    """Inside the WebUI torch.load is modules.safe.load, which rejects the zip entries current torch writes and
    returns None (seen in the real WebUI: Resume failed). Training states are read with torch's own loader."""
    import sys
    from types import SimpleNamespace

    from lib_adapters.training.run_checkpoints import read_state

    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    config = _config(tmp_path, "a", steps=1)
    train(config, tiny("sd1")[1])
    state_path = checkpoint_paths(config, 1)[1]
    monkeypatch.setitem(sys.modules, "modules.safe", SimpleNamespace(unsafe_torch_load=torch.load))
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # what safe.load returns for these files
    assert read_state(state_path).step == 1


class _CountCheckpoints(_StopAt):
    def __init__(self, step: int):
        super().__init__(step)
        self.saved: list[int] = []

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.saved.append(step)


def test_an_interrupt_right_after_a_scheduled_checkpoint_does_not_write_it_again(tmp_path):
    # The real WebUI 1.10.1 showed "checkpoint at step 4: ..." twice in the job's log (and wrote the files twice)
    # when Interrupt came during step 4 of a run with save_every 2.
    make_shapes_dataset(tmp_path / "ds", "2_shapes", count=2)
    stopper = _CountCheckpoints(4)
    result = train(_config(tmp_path, "a", save_every=2), tiny("sd1")[1], callbacks=stopper)
    state = checkpoint_paths(_config(tmp_path, "a"), 4)[1]
    assert result.interrupted and result.step == 4
    assert stopper.saved == [2, 4] and result.checkpoints == [checkpoint_paths(_config(tmp_path, "a"), 2)[1], state]
    # between scheduled checkpoints the interrupt still saves its own, and a resumed run interrupted before its
    # first step still names its checkpoint
    stopper = _CountCheckpoints(3)
    result = train(_config(tmp_path, "b", save_every=2), tiny("sd1")[1], callbacks=stopper)
    assert stopper.saved == [2, 3] and result.interrupted
    stopper = _CountCheckpoints(0)
    resumed = train(_config(tmp_path, "b", save_every=2), tiny("sd1")[1], callbacks=stopper,
                    resume_from=checkpoint_paths(_config(tmp_path, "b"), 3)[1])
    assert resumed.interrupted and resumed.step == 3 and resumed.checkpoints

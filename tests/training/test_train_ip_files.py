"""IP-Adapter training files and runs: diffusers' IP-Adapter loader reads every key of our file and computes what
our training forward computed; fine-tuning starts from a file; an interrupted run resumes bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import make_shapes_dataset, resumes_bit_for_bit, tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from fixtures.ip import random_ip_state_dict
from lib_adapters.errors import IncompatibleModelError, InputError
from lib_adapters.training.run_checkpoints import checkpoint_paths
from lib_adapters.training.config import IPAdapterConfig, TrainConfig
from lib_adapters.training.loop import train
from lib_adapters.training.methods.base import ExportInfo
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod
from lib_adapters.unet.layout import bind_layout

pytest.importorskip("diffusers")
from test_train_diffusers import _pair  # noqa: E402  (the stub model, its ldm backend, a diffusers twin)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_clip_vision(tiny_clip_vision(), tmp_path_factory.mktemp("clip"))


class _Recording(dict):
    """A state dict that remembers which keys a loader read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def items(self):
        self.read.update(self.keys())
        return super().items()


def _perturbed_export(method: IPAdapterMethod, backend, path: Path, seed: int = 5) -> Path:
    """Move every weight off its initial value (as training would), then export in fp32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    config = TrainConfig(path.parent, path.parent, path.stem, method="ip_adapter")
    return method.export(path, ExportInfo(config, backend.model_info(), 1, 1), torch.float32)


@pytest.mark.parametrize("arch,projection", [("sd1", "plain"), ("sd1", "plus"), ("sdxl", "plus")])
def test_diffusers_reads_every_key_and_computes_our_training_forward(arch, projection, encoder, tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    _, _, dif = _pair(arch)
    method = IPAdapterMethod(dif, IPAdapterConfig(projection=projection, image_encoder=encoder))
    path = _perturbed_export(method, dif, tmp_path / "ip.safetensors")

    flat = load_file(str(path))
    nested = {part: _Recording({k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")})
              for part in ("image_proj", "ip_adapter")}
    assert sum(map(len, nested.values())) == len(flat)
    _, _, ref = _pair(arch)  # the same tiny weights, a separate UNet for diffusers' processors
    ref.unet._load_ip_adapter_weights([nested])
    assert nested["ip_adapter"].read == set(nested["ip_adapter"])  # zero unexpected keys (missing ones raise)
    assert nested["image_proj"].read == set(nested["image_proj"])

    images = sorted((tmp_path / "ds" / "1_shapes").glob("*.png"))
    features = method.features.get(images)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
    with torch.no_grad():
        cond = dif.encode_prompts(["a shape", "a shape"])
        with method.tokens_active(method.image_tokens(features)):
            ours = dif.apply(x, t, cond)
        plain = dif.apply(x, t, cond)
        embeds = {"image_embeds": [features[:, None]]}  # [rows, 1 image, ...]
        context = cond["crossattn"] if isinstance(cond, dict) else cond  # the tiny SDXL UNet takes no vector
        theirs = ref.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=embeds).sample
    method.close()
    assert (ours - plain).abs().max() > 1e-2
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_fine_tuning_starts_from_the_file_and_refuses_a_mismatch(encoder, tmp_path):
    _, backend = tiny("sd1")
    first = IPAdapterMethod(backend, IPAdapterConfig(projection="plus", image_encoder=encoder))
    path = _perturbed_export(first, backend, tmp_path / "plus.safetensors")
    first.close()
    tuned = IPAdapterMethod(backend, IPAdapterConfig(projection="plus", image_encoder=encoder, init_from=path))
    saved = load_file(str(path))
    assert all(torch.equal(saved[k], v) for k, v in tuned.model.state_dict().items())
    assert all(p.requires_grad for p in tuned.model.parameters())
    tuned.close()
    with pytest.raises(InputError, match="holds a plus IP-Adapter but ip_projection is plain"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="plain", image_encoder=encoder, init_from=path))
    other = save_clip_vision(tiny_clip_vision(hidden=64), tmp_path / "clip64")
    with pytest.raises(IncompatibleModelError, match="gives width 64"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="plus", image_encoder=other, init_from=path))
    _, xl = tiny("sdxl")
    with pytest.raises(IncompatibleModelError, match="attention sites"):
        IPAdapterMethod(xl, IPAdapterConfig(projection="plus", image_encoder=encoder, init_from=path))
    nested = random_ip_state_dict(bind_layout(backend.unet), "full", 32)
    full = tmp_path / "full.safetensors"
    save_file({f"{part}.{k}": v for part, sd in nested.items() for k, v in sd.items()}, str(full))
    with pytest.raises(InputError, match="full-face IP-Adapter; training supports plain and plus"):
        IPAdapterMethod(backend, IPAdapterConfig(projection="plus", image_encoder=encoder, init_from=full))
def test_interrupt_then_resume_equals_an_uninterrupted_run_bit_for_bit(encoder, tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=3)

    def config(out: str) -> TrainConfig:
        ip = IPAdapterConfig(projection="plus", image_encoder=encoder, image_drop=0.2, text_drop=0.2, both_drop=0.2)
        return TrainConfig(tmp_path / "ds", tmp_path / out, "ip", method="ip_adapter", resolution=64, steps=4,
                           batch_size=2, learning_rate=1e-3, seed=5, noise_offset=0.05, ip=ip)

    resumes_bit_for_bit(config)
    assert any((config("b").cache_dir / "clip-features").glob("*.clipfeat"))  # the resumed run read cached features
    changed = TrainConfig(tmp_path / "ds", tmp_path / "b", "ip", method="ip_adapter", resolution=64, steps=4,
                          batch_size=2, seed=5, ip=IPAdapterConfig(projection="plain", image_encoder=encoder))
    with pytest.raises(InputError, match="ip_projection: 'plus' -> 'plain'"):
        train(changed, tiny("sd1")[1], resume_from=checkpoint_paths(config("b"), 2)[1])


def test_gradient_checkpointing_and_samples_change_nothing(encoder, tmp_path):
    """Checkpointed blocks replay attn2 during backward, after the batch's context has closed: same numbers."""
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    files = []
    for checkpointing in (False, True):
        config = TrainConfig(tmp_path / "ds", tmp_path / f"out{checkpointing}", "ip", method="ip_adapter",
                             resolution=64, steps=2, batch_size=2, learning_rate=1e-2, seed=0,
                             gradient_checkpointing=checkpointing, sample_every=1, sample_prompts=("a shape",),
                             sample_steps=2, ip=IPAdapterConfig(projection="plus", image_encoder=encoder),
                             save_precision="fp32")
        result = train(config, tiny("sd1")[1])
        files.append((result.losses, load_file(str(result.output))))
        assert len(list((tmp_path / f"out{checkpointing}" / "ip-samples").glob("*.png"))) == 2
    (losses_a, a), (losses_b, b) = files
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)

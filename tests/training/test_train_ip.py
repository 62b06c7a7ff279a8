"""IP-Adapter training: the reference's initialisation and dropout, and short runs (plain and Plus, SD1 and SDXL,
ldm and diffusers backends) that train both parts, export files our panel's loader reads with the reference's
key numbering, and leave the UNet exactly as it was."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import make_shapes_dataset, tiny

from fixtures.clip import save_clip_vision, tiny_clip_vision
from lib_adapters.formats.ip import load_ip_adapter
from lib_adapters.models.ip_adapter import IPProjection
from lib_adapters.training.config import IPAdapterConfig, TrainConfig
from lib_adapters.training.loop import train
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod, draw_drops
from lib_adapters.unet.layout import bind_layout


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_clip_vision(tiny_clip_vision(), tmp_path_factory.mktemp("clip"))


def _config(tmp_path: Path, out: str, encoder: Path, projection: str = "plain", **kwargs) -> TrainConfig:
    ip = dict(projection=projection, image_encoder=encoder)
    ip.update(kwargs.pop("ip", {}))
    defaults = dict(method="ip_adapter", resolution=64, steps=2, batch_size=2, learning_rate=1e-3, seed=3)
    defaults.update(kwargs)
    return TrainConfig(tmp_path / "ds", tmp_path / out, "ip", ip=IPAdapterConfig(**ip), **defaults)


def _unet_snapshot(unet: torch.nn.Module) -> tuple[dict, list, list]:
    """Weights, instance-level forwards (our wrappers would be these) and requires_grad flags."""
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    patched = [name for name, m in unet.named_modules() if "forward" in m.__dict__]
    return state, patched, [p.requires_grad for p in unet.parameters()]


def _same_unet(unet: torch.nn.Module, snapshot: tuple[dict, list, list]) -> bool:
    state = unet.state_dict()
    return (_unet_snapshot(unet)[1:] == snapshot[1:] and state.keys() == snapshot[0].keys()
            and all(torch.equal(v, snapshot[0][k]) for k, v in state.items()))


def test_each_process_draws_its_rows_of_the_global_dropout():
    """In a multi-process run every process draws the whole global batch's dropout and keeps its rows: the
    processes' generators stay in step and each sample is dropped as a single process would drop it."""
    from lib_adapters.training.methods.base import MethodBatch

    config = IPAdapterConfig(image_drop=0.3, text_drop=0.3, both_drop=0.3)

    def drops_for(rows: slice, total: int = 8):
        method = object.__new__(IPAdapterMethod)  # drops() needs only the config
        method.config, method._drops = config, None
        size = rows.stop - rows.start
        batch = MethodBatch([None] * size, [None] * size, torch.Generator().manual_seed(5), torch.device("cpu"),
                            total, rows)
        return method.drops(batch), batch.generator.get_state()

    whole, state = drops_for(slice(0, 8))
    first, state_first = drops_for(slice(0, 4))
    second, state_second = drops_for(slice(4, 8))
    assert first + second == whole and len({tuple(d.__dict__.values()) for d in whole}) > 1
    assert torch.equal(state_first, state) and torch.equal(state_second, state)


def test_dropout_splits_as_the_reference_and_repeats_from_the_generator():
    config = IPAdapterConfig()
    drops = draw_drops(20000, config, torch.Generator().manual_seed(0))
    image_only = sum(d.image and not d.text for d in drops) / len(drops)
    text_only = sum(d.text and not d.image for d in drops) / len(drops)
    both = sum(d.image and d.text for d in drops) / len(drops)
    assert all(abs(rate - 0.05) < 0.006 for rate in (image_only, text_only, both)), (image_only, text_only, both)
    again = [draw_drops(50, config, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert again[0] == again[1]
    never = IPAdapterConfig(image_drop=0, text_drop=0, both_drop=0)
    assert not any(d.image or d.text for d in draw_drops(500, never, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_new_adapter_copies_to_k_to_v_and_leaves_the_unet_as_it_was(arch, encoder, tmp_path):
    model, backend = tiny(arch)
    unet = model.model.diffusion_model
    before = _unet_snapshot(unet)
    method = IPAdapterMethod(backend, IPAdapterConfig(image_encoder=encoder))
    sites = bind_layout(unet).ip_sites()
    assert [s.number for s in sites] == list(range(1, 2 * len(sites), 2))
    for site in sites:
        attn = unet.get_submodule(site.path)
        assert torch.equal(method.model.site(site.number).to_k_ip.weight, attn.to_k.weight)
        assert torch.equal(method.model.site(site.number).to_v_ip.weight, attn.to_v.weight)
    assert method.model.image_proj.config.num_tokens == 4
    assert all(p.requires_grad for p in method.model.parameters())
    assert not any(p.requires_grad for p in method.encoder.model.parameters())
    method.close()
    assert _same_unet(unet, before)


def _changed(path: Path, arch: str, encoder: Path) -> list[str]:
    """Keys of the exported file that moved away from the run's initial weights (``to_k_ip`` = ``to_k`` ...)."""
    _, backend = tiny(arch)
    projection = "plus" if load_ip_adapter(path).variant is IPProjection.PLUS else "plain"
    torch.manual_seed(3)  # the run's seed: the same initial projection as the run drew
    fresh = IPAdapterMethod(backend, IPAdapterConfig(projection=projection, image_encoder=encoder))
    fresh.close()
    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if not torch.allclose(f.get_tensor(k).float(), fresh.model.state_dict()[k],
                                                         atol=1e-3)]


def _diffusers_backend(arch: str):
    pytest.importorskip("diffusers")
    from test_train_diffusers import _pair

    return _pair(arch)


RUNS = [("sd1", "ldm", "plain"), ("sd1", "ldm", "plus"), ("sd1", "diffusers", "plain"), ("sd1", "diffusers", "plus"),
        ("sdxl", "ldm", "plain"), ("sdxl", "diffusers", "plus")]


@pytest.mark.parametrize("arch,kind,projection", RUNS, ids=["-".join(r) for r in RUNS])
def test_a_short_run_exports_a_file_our_loader_reads(arch, kind, projection, encoder, tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes")
    if kind == "ldm":
        model, backend = tiny(arch)
        unet = model.model.diffusion_model
    else:
        _, _, backend = _diffusers_backend(arch)
        unet = backend.unet
    before = _unet_snapshot(unet)
    result = train(_config(tmp_path, "out", encoder, projection, learning_rate=1e-2), backend)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert _same_unet(unet, before)
    loaded = load_ip_adapter(result.output)
    assert loaded.variant is (IPProjection.PLUS if projection == "plus" else IPProjection.PLAIN)
    assert loaded.projection.num_tokens == (16 if projection == "plus" else 4)
    sites = bind_layout(tiny(arch)[0].model.diffusion_model).ip_sites()
    assert loaded.site_hidden == {s.number: s.hidden for s in sites}  # the reference numbering: 1, 3, 5, ...
    with safe_open(str(result.output), framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("ip_adapter.1.to_k_ip.weight").dtype == torch.float16
    assert metadata["ip_projection"] == projection and metadata["steps"] == "2"
    assert metadata["clip_vision_input"] == ("hidden_states[-2]" if projection == "plus" else "image_embeds")
    changed = _changed(result.output, arch, encoder)
    assert any(k.startswith("image_proj.") for k in changed) and any(k.startswith("ip_adapter.") for k in changed)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_finished_run_leaves_nothing_of_itself_in_memory(checkpointing, encoder, tmp_path):
    """The hook that drops a step's image tokens after backward held the tokens and the method: a cycle through
    autograd's C++ graph that Python's collector cannot see, so every IP run kept its method, the encoder, the
    features and the model alive for the rest of the WebUI's session."""
    make_shapes_dataset(tmp_path / "ds", "1_shapes")
    _, backend = tiny("sd1")

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, IPAdapterMethod) for o in gc.get_objects())

    before = alive()
    result = train(_config(tmp_path, "out", encoder, gradient_checkpointing=checkpointing), backend)
    assert len(result.losses) == 2 and result.output.is_file()
    del result
    assert alive() == before

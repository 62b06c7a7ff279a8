"""The ldm/sgm backend over the stub WebUI model (SD1 and SDXL): shapes, values, freezing, checkpointing."""
from __future__ import annotations

import pytest
import torch
from train_helpers import tiny, unet_inputs

from lib_adapters.arch import BaseArch
from lib_adapters.errors import IncompatibleModelError
from lib_adapters.tiny import scaled_linear_alphas_cumprod
from lib_adapters.training.backends.base import Parameterization, SizeCondition, TextEncoderNaming
from lib_adapters.training.backends.ldm import LdmBackend
from lib_adapters.training.config import LoraConfig
from lib_adapters.training.methods.lora import build_lora_network


def _pixels(n=2, h=64, w=64, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sd1_backend_encodes_and_predicts_like_the_model():
    model, backend = tiny("sd1")
    assert backend.arch is BaseArch.SD1 and backend.parameterization is Parameterization.EPS
    assert torch.equal(backend.alphas_cumprod, scaled_linear_alphas_cumprod())
    pixels = _pixels(h=64, w=128)
    latents = backend.encode_images(pixels)
    with torch.no_grad():
        expected = 0.18215 * model.first_stage_model.encode(pixels).mean
    assert latents.shape == (2, 4, 8, 16) and torch.equal(latents, expected)
    cond = backend.encode_prompts(["a red circle", "a blue square"])
    assert cond.shape == (2, 77, 32) and not cond.requires_grad
    assert torch.equal(cond, model.get_learned_conditioning(["a red circle", "a blue square"]))
    x, t, c = unet_inputs(model)
    with torch.no_grad():
        assert torch.equal(backend.apply(x, t, c), model.apply_model(x, t, c))
    [part] = backend.text_encoders()
    assert part.prefix == "lora_te" and part.module is model.cond_stage_model.wrapped.transformer
    assert part.naming is TextEncoderNaming.HF_CLIP
    info = backend.model_info()
    assert info.base_model_version == "sd_v1" and info.name == "tiny-sd1-seed0.safetensors"
    assert info.sha256 == model.sd_checkpoint_info.sha256


def test_sdxl_backend_uses_the_conditioner_with_size_conditioning():
    model, backend = tiny("sdxl")
    assert backend.arch is BaseArch.SDXL and backend.is_sgm
    latents = backend.encode_images(_pixels())
    with torch.no_grad():
        assert torch.equal(latents, model.encode_first_stage(_pixels()))  # sgm: already scaled (0.13025)
    cond = backend.encode_prompts(["a red circle", "a blue square"])
    assert cond["crossattn"].shape == (2, 77, 32) and cond["vector"].shape == (2, 64)
    reference = model.get_learned_conditioning(["a red circle", "a blue square"])  # WebUI defaults: 1024x1024, no crop
    assert torch.equal(cond["crossattn"], reference["crossattn"]) and torch.equal(cond["vector"], reference["vector"])
    sized = backend.encode_prompts(["a red circle"] * 2, [SizeCondition((512, 768), (0, 32), (512, 512))] * 2)
    assert torch.equal(sized["crossattn"], cond["crossattn"][:1].expand(2, -1, -1))
    assert not torch.equal(sized["vector"][:, 16:], cond["vector"][:1, 16:].expand(2, -1))  # size embeddings differ
    assert torch.equal(sized["vector"][:, :16], cond["vector"][:1, :16].expand(2, -1))  # pooled text identical
    x, t, _ = unet_inputs(model)
    with torch.no_grad():
        assert torch.equal(backend.apply(x, t, cond), model.apply_model(x, t, cond))
    assert [p.prefix for p in backend.text_encoders()] == ["lora_te1", "lora_te2"]
    assert backend.text_encoders()[1].module is model.conditioner.embedders[1].wrapped.transformer
    assert backend.model_info().base_model_version == "sdxl_base_v1-0"


def test_parameterization_is_read_from_the_model():
    model, _ = tiny("sd1")
    model.parameterization = "v"
    assert LdmBackend(model).parameterization is Parameterization.V
    assert LdmBackend(model).model_info().base_model_version == "sd_v1_v"
    model.parameterization = "x0"
    with pytest.raises(IncompatibleModelError, match="x0"):
        LdmBackend(model)


def test_identity_follows_the_vae_weights():
    model, backend = tiny("sd1")
    before = backend.identity()
    with torch.no_grad():
        model.first_stage_model.encoder.conv_in.weight[0, 0, 0, 0] += 1.0
    after = backend.identity()
    assert after.model == before.model and after.vae != before.vae


def test_prepare_freezes_the_base_and_restore_puts_it_back():
    model, backend = tiny("sdxl")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values())  # the stub's UNet is trainable, as ldm leaves it
    backend.prepare(gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert all("forward" in block.__dict__ for block in backend.checkpoint_blocks())
    backend.restore()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("forward" in block.__dict__ for block in backend.checkpoint_blocks())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    model, backend = tiny(arch)
    x, t, cond = unet_inputs(model)
    network = build_lora_network(backend, LoraConfig(rank=2))
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.normal_(0, 0.1)
    network.attach()
    grads = []
    for checkpointing in (False, True):
        backend.prepare(gradient_checkpointing=checkpointing)
        network.zero_grad(set_to_none=True)
        backend.apply(x, t, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in network.parameters()])
        backend.restore()
    network.detach()
    assert len(grads[0]) == len(list(network.parameters())) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))

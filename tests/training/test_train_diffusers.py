"""The diffusers backend: same conditioning and predictions as the ldm backend on identical weights, the same
kohya LoRA names (so files are interchangeable), and a short training run over diffusers components."""
from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import make_shapes_dataset, tiny, unet_inputs

pytest.importorskip("diffusers")

from fixtures.unets import to_diffusers_unet  # noqa: E402

from lib_adapters.tiny import TINY_SD1, TINY_SDXL  # noqa: E402
from lib_adapters.training.backends.diffusers import DiffusersBackend  # noqa: E402
from lib_adapters.training.config import LoraConfig, TrainConfig  # noqa: E402
from lib_adapters.training.loop import train  # noqa: E402
from lib_adapters.training.methods.base import ExportInfo  # noqa: E402
from lib_adapters.training.methods.lora import LoraMethod  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402

FULL = LoraConfig(rank=4, alpha=2.0, targets="attention+ff+conv", train_text_encoder=True)
PROMPTS = ["a red circle", "a blue square"]


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
                         sample_size=64).eval()


def _pair(arch: str):
    """(stub model, its ldm backend, a diffusers backend over the same UNet weights and text encoders)."""
    model, ldm = tiny(arch)
    unet = to_diffusers_unet(model.model.diffusion_model, TINY_SD1 if arch == "sd1" else dict(TINY_SDXL, context_dim=32))
    embedders = [model.cond_stage_model] if arch == "sd1" else list(model.conditioner.embedders)
    encoders = [copy.deepcopy(e.wrapped.transformer) for e in embedders]  # own copies: LoRA hooks stay separate
    tokenizers = [e.wrapped.tokenizer for e in embedders]
    return model, ldm, DiffusersBackend(unet, _vae(), encoders, tokenizers, model.alphas_cumprod)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_conditioning_and_predictions_match_the_ldm_backend(arch):
    model, ldm, dif = _pair(arch)
    assert dif.arch is ldm.arch
    with torch.no_grad():
        cond_l, cond_d = ldm.encode_prompts(PROMPTS), dif.encode_prompts(PROMPTS)
        x, t, _ = unet_inputs(model)
        if arch == "sd1":
            assert torch.equal(cond_l, cond_d)
        else:
            assert torch.equal(cond_l["crossattn"], cond_d["crossattn"])
            assert torch.equal(cond_l["vector"][:, :16], cond_d["text_embeds"])  # pooled bigG-like output
            assert cond_d["time_ids"].tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2
        assert torch.allclose(ldm.apply(x, t, cond_l), dif.apply(x, t, cond_d), atol=1e-4, rtol=1e-4)
        latents = dif.encode_images(torch.zeros(2, 3, 64, 64))
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lora_files_are_the_same_from_either_backend(arch, tmp_path):
    model, ldm, dif = _pair(arch)
    a, b = LoraMethod(ldm, FULL), LoraMethod(dif, FULL)
    assert set(a.network.loras) == set(b.network.loras)
    shapes = {k: tuple(v.shape) for k, v in a.network.kohya_state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in b.network.kohya_state_dict().items()}
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for lora in b.network.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.05)
    x, t, _ = unet_inputs(model)
    config = TrainConfig(tmp_path, tmp_path, "x", lora=FULL, save_precision="fp32")
    path = b.export(tmp_path / "x.safetensors", ExportInfo(config, dif.model_info(), 1, 1))
    a.load_trainable_file(path)  # a file trained over diffusers loads into the WebUI-side network
    with torch.no_grad():
        out_d = dif.apply(x, t, dif.encode_prompts(PROMPTS))
        out_l = ldm.apply(x, t, ldm.encode_prompts(PROMPTS))
    assert torch.allclose(out_l, out_d, atol=1e-4, rtol=1e-4)
    a.close()
    b.close()


def test_a_short_run_over_diffusers_components(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    _, _, dif = _pair("sd1")
    config = TrainConfig(tmp_path / "ds", tmp_path / "out", "d", resolution=64, steps=2, batch_size=2,
                         lora=LoraConfig(rank=2, alpha=2.0))
    result = train(config, dif)
    tensors, metadata = load_lora(result.output)
    assert len(result.losses) == 2 and all(l == l for l in result.losses)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == "diffusers"

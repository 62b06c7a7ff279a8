"""LoRA: zero-init identity, kohya names and metadata, and loading by the WebUI's Lora extension and by diffusers."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from torch import nn
from train_helpers import tiny, unet_inputs, webui_sdxl_view
from webui_lora import accepts_lora, match_keys, merged_delta

from lib_adapters.errors import FormatError
from lib_adapters.training.config import LoraConfig, TrainConfig
from lib_adapters.training.methods.base import ExportInfo
from lib_adapters.training.methods.lora import LoraMethod
from lib_adapters.training.methods.lora_file import load_lora

FULL = LoraConfig(rank=4, alpha=2.0, targets="attention+ff+conv", train_text_encoder=True)


def _randomise(method: LoraMethod, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in method.network.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.05)


def _export(method: LoraMethod, backend, tmp_path, name="tiny_lora", **config):
    config = TrainConfig(tmp_path, tmp_path, name, lora=method.config, **{"save_precision": "fp32", **config})
    info = ExportInfo(config, backend.model_info(), step=7, num_images=3, tag_frequency={"2_x": {"red": 2}})
    return method.export(tmp_path / f"{name}.safetensors", info)


def _outputs(model, backend, x, t):
    with torch.no_grad():
        cond = backend.encode_prompts(["a red circle", "a blue square"])
        return cond, backend.apply(x, t, cond)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_zero_init_leaves_the_model_bit_identical(arch):
    model, backend = tiny(arch)
    x, t, _ = unet_inputs(model)
    cond0, out0 = _outputs(model, backend, x, t)
    method = LoraMethod(backend, FULL)
    cond1, out1 = _outputs(model, backend, x, t)
    assert all(p.dtype == torch.float32 for p in method.network.parameters())
    assert torch.equal(out0, out1)
    assert all(torch.equal(cond0[k], cond1[k]) for k in cond0) if isinstance(cond0, dict) else torch.equal(cond0, cond1)
    _randomise(method)
    assert not torch.equal(_outputs(model, backend, x, t)[1], out0)
    method.close()
    assert torch.equal(_outputs(model, backend, x, t)[1], out0)  # hooks removed: the base model is as before


def test_sd1_names_are_kohya_diffusers_style(tmp_path):
    model, backend = tiny("sd1")
    attention = LoraMethod(backend, LoraConfig(rank=4))
    assert len(attention.network.loras) == 16 * 8  # 16 transformers x attn1/attn2 x q, k, v, out
    attention.close()
    method = LoraMethod(backend, FULL)
    names = set(method.network.loras)
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_down_blocks_2_attentions_1_proj_in", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "lora_unet_down_blocks_2_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_up_blocks_1_resnets_2_conv2",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_1_mlp_fc2"} <= names
    assert not any("input_blocks" in n or "output_blocks" in n or "middle_block" in n for n in names)
    assert sum(n.startswith("lora_unet_") and "attentions" in n for n in names) == 16 * 12  # kohya's SD1.5 count
    assert sum(n.startswith("lora_te_") for n in names) == 2 * 6
    tensors, metadata = load_lora(_export(method, backend, tmp_path))
    assert set(tensors) == {f"{n}.{k}" for n in names for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 32)
    assert all(tensors[f"{n}.alpha"].item() == 2.0 for n in names)
    method.close()


def test_sdxl_names_are_kohya_sgm_style(tmp_path):
    model, backend = tiny("sdxl")
    method = LoraMethod(backend, FULL)
    names = set(method.network.loras)
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_out",
            "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_0_proj", "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1"} <= names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    method.close()


def test_metadata_is_what_kohya_writes_and_the_webui_reads(tmp_path):
    _, backend = tiny("sd1")
    method = LoraMethod(backend, FULL)
    path = _export(method, backend, tmp_path, name="my_style", learning_rate=2e-4)
    data = path.read_bytes()
    tensors, md = load_lora(path)
    assert md["ss_output_name"] == "my_style" and md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert json.loads(md["ss_tag_frequency"]) == {"2_x": {"red": 2}}
    assert md["ss_new_sd_model_hash"] == backend.model_info().sha256 and md["ss_steps"] == "7"
    assert md["ss_learning_rate"] == "0.0002" and md["ss_network_train_unet_only"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.prediction_type"] == "epsilon"
    header = int.from_bytes(data[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()  # kohya/addnet payload hash
    assert re.fullmatch(r"[0-9a-f]{8}", md["sshs_legacy_hash"])
    assert all(isinstance(v, str) for v in md.values())
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file
    method.close()


def _webui_model(arch, model):
    return webui_sdxl_view(model) if arch == "sdxl" else model


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_the_webui_lora_extension_matches_every_key(arch, tmp_path):
    model, backend = tiny(arch)
    method = LoraMethod(backend, FULL)
    tensors, _ = load_lora(_export(method, backend, tmp_path))
    matched, failed = match_keys(tensors, _webui_model(arch, model))
    assert failed == {}
    assert len(matched) == len(method.network.loras) and all(accepts_lora(e) for e in matched.values())
    by_network_key = {e.weights["lora_down.weight"].data_ptr(): e for e in matched.values()}
    assert len(by_network_key) == len(matched)
    ours = {name: method.network._bases[name] for name in method.network.loras}
    for name, base in ours.items():
        entry = next(e for e in matched.values() if e.weights["lora_down.weight"] is tensors[f"{name}.lora_down.weight"])
        if name.startswith("lora_te2_"):  # the WebUI's OpenCLIP encoder: q/k/v land on the fused attention
            assert isinstance(entry.module, nn.MultiheadAttention) == bool(re.search(r"_[qkv]_proj$", name))
        else:
            assert entry.module is base, name
    method.close()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_webui_merged_weights_give_the_trained_output(arch, tmp_path):
    """What the WebUI computes (up @ down * alpha/dim merged into each layer) equals our hooked forward."""
    model, backend = tiny(arch)
    x, t, fixed_cond = unet_inputs(model)
    method = LoraMethod(backend, FULL)
    _randomise(method, seed=1)
    with torch.no_grad():
        expected = backend.apply(x, t, fixed_cond)
        expected_cond = backend.encode_prompts(["a red circle", "a blue square"])
        baseline = tiny(arch)[1].apply(x, t, fixed_cond)
    tensors, _ = load_lora(_export(method, backend, tmp_path))
    method.close()
    matched, _ = match_keys(tensors, model)  # the stub's own layout: every UNet and first-encoder layer
    with torch.no_grad():
        for entry in matched.values():
            entry.module.weight += merged_delta(entry)
        out = backend.apply(x, t, fixed_cond)
        cond = backend.encode_prompts(["a red circle", "a blue square"])
    assert not torch.allclose(out, baseline, atol=1e-3)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)
    if arch == "sd1":  # SDXL's second encoder is OpenCLIP in the WebUI, so the stub cannot merge it the WebUI's way
        assert torch.allclose(cond, expected_cond, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_reload_into_a_fresh_model_gives_the_same_outputs(arch, tmp_path):
    model, backend = tiny(arch)
    x, t, _ = unet_inputs(model)
    method = LoraMethod(backend, FULL)
    _randomise(method, seed=2)
    expected = _outputs(model, backend, x, t)[1]
    path = _export(method, backend, tmp_path)
    method.close()
    fresh_model, fresh = tiny(arch)
    loaded = LoraMethod(fresh, FULL)
    loaded.load_trainable_file(path)
    assert torch.equal(_outputs(fresh_model, fresh, x, t)[1], expected)
    loaded.close()
    wrong = LoraMethod(fresh, LoraConfig(rank=8, targets="attention+ff+conv", train_text_encoder=True))
    with pytest.raises(FormatError, match="wrong shapes"):
        wrong.load_trainable_file(path)
    wrong.close()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_reads_the_file_onto_its_own_unet(arch, tmp_path):
    """diffusers' own kohya converter (``lora_state_dict``; SDXL via ``_maybe_map_sgm_blocks_to_diffusers``) turns
    every UNet key into a layer of the diffusers twin UNet, and merging them reproduces our output."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from fixtures.unets import to_diffusers_unet

    from lib_adapters.tiny import TINY_SD1, TINY_SDXL

    model, backend = tiny(arch)
    twin = to_diffusers_unet(model.model.diffusion_model, TINY_SD1 if arch == "sd1" else dict(TINY_SDXL, context_dim=32))
    x, t, cond = unet_inputs(model)
    context = cond if arch == "sd1" else cond["crossattn"]
    method = LoraMethod(backend, FULL)
    _randomise(method, seed=3)
    with torch.no_grad():
        expected = method.backend.unet(x, t, context=context)
    path = _export(method, backend, tmp_path)
    method.close()
    if arch == "sd1":
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    else:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=twin.config)
    unet_state = convert_unet_state_dict_to_peft({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    layers = dict(twin.named_modules())
    pairs = {k.rsplit(".lora_", 1)[0] for k in unet_state}
    assert len(pairs) == sum(n.startswith("lora_unet_") for n in method.network.loras)
    assert all(p in layers for p in pairs)
    for index, part in enumerate(backend.text_encoders()):  # text_encoder / text_encoder_2: transformers CLIP paths
        prefix = "text_encoder" + (f"_{index + 1}" if index else "") + "."
        text_state = convert_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        text_layers = {k.rsplit(".lora_", 1)[0] for k in text_state}
        assert len(text_layers) == sum(n.startswith(part.prefix + "_") for n in method.network.loras) > 0
        assert text_layers <= set(dict(part.module.named_modules()))
    alpha_of = {}
    for key, value in alphas.items():  # diffusers keys alphas by its old processor names; map them as it does
        if key.startswith("unet."):
            name = key[len("unet."):-len(".alpha")]
            if name.endswith(".down.weight"):
                name = next(iter(convert_unet_state_dict_to_peft({name: 0}))).rsplit(".lora_", 1)[0]
            alpha_of[name] = float(value)
    assert set(alpha_of) == pairs
    with torch.no_grad():
        for p in pairs:
            down, up = unet_state[f"{p}.lora_A.weight"].float(), unet_state[f"{p}.lora_B.weight"].float()
            scale = alpha_of[p] / down.shape[0]
            weight = layers[p].weight
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
            weight += delta * scale
        out = twin(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_diffusers_load_lora_weights_needs_its_peft_backend():
    """diffusers 0.31's ``load_lora_weights``/``load_lora_into_unet`` require PEFT >= 0.6 *and* transformers >= 4.34;
    the WebUI pins transformers 4.30.2, so there it refuses whatever file it is given (checked here, or run for real)."""
    pytest.importorskip("diffusers")
    from diffusers.utils import constants

    if constants.USE_PEFT_BACKEND:
        pytest.skip("a PEFT backend is available here; the conversion test above covers the keys")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    with pytest.raises(ValueError, match="PEFT backend is required"):
        StableDiffusionLoraLoaderMixin.load_lora_into_unet({}, None, nn.Linear(1, 1))


def _two_repeat_folders(root):
    """3_red: a square and a slightly wide image; 2_blue: a 3:1 image and a square (sizes chosen for two buckets)."""
    from PIL import Image

    for folder, sizes in (("3_red", [(128, 128), (136, 128)]), ("2_blue", [(192, 64), (128, 128)])):
        (root / folder).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (200, 40 * i, 40)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text(f"{folder[2:]} thing, shape {i}")
    return root


def test_kohya_metadata_keys_and_value_formats_for_a_dataset_with_two_repeat_folders(tmp_path):
    from lib_adapters.training.backends.ldm import LdmBackend
    from lib_adapters.training.loop import train
    from lib_adapters.training.methods.lora_file import optimizer_name

    model, _ = tiny("sd1")
    checkpoint = tmp_path / "model.safetensors"  # the loaded checkpoint's file: the WebUI hashes it
    checkpoint.write_bytes(bytes(range(256)) * 5000)
    from modules import sd_models
    model.sd_checkpoint_info = sd_models.CheckpointInfo(str(checkpoint), sha256=hashlib.sha256(
        checkpoint.read_bytes()).hexdigest())
    backend = LdmBackend(model, clip_skip=2)  # the WebUI's "Clip skip" 2
    config = TrainConfig(_two_repeat_folders(tmp_path / "ds"), tmp_path / "out", "kohya", resolution=128, steps=4,
                         batch_size=2, grad_accumulation=2, learning_rate=1e-3,
                         lora=LoraConfig(rank=2, alpha=1.0), save_precision="fp16")
    tensors, md = load_lora(train(config, backend).output)
    # kohya's rules (train_network.py, train_util.py), by hand for this dataset:
    # 2 images x 3 repeats + 2 images x 2 repeats
    assert md["ss_num_train_images"] == "10"
    assert json.loads(md["ss_dataset_dirs"]) == {"3_red": {"n_repeats": 3, "img_count": 2},
                                                 "2_blue": {"n_repeats": 2, "img_count": 2}}
    assert md["ss_dataset_dirs"].startswith('{"2_blue": {"n_repeats": 2, "img_count": 2}')  # json.dumps' spacing
    # buckets in use sorted by (w, h): 128x128 holds 3+3+2 = 8 images with repeats, 192x64 the 3:1 image twice;
    # mean |bucket w/h - image w/h| over the 4 images: (0 + (136/128 - 1) + 0 + 0) / 4
    assert md["ss_bucket_info"] == json.dumps({"buckets": {"0": {"resolution": [128, 128], "count": 8},
                                                           "1": {"resolution": [192, 64], "count": 2}},
                                               "mean_img_ar_error": 0.015625})
    # batches of 2 within a bucket: 4 + 1; 4 steps of 2 batches, 3 steps an epoch: 2 epochs
    assert md["ss_num_batches_per_epoch"] == "5" and md["ss_num_epochs"] == "2"
    assert md["ss_resolution"] == "(128, 128)" and md["ss_clip_skip"] == "2"
    assert md["ss_shuffle_caption"] == "False" and md["ss_keep_tokens"] == "0" and md["ss_flip_aug"] == "False"
    data = checkpoint.read_bytes()
    assert md["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # kohya's model_hash
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()  # kohya's calculate_sha256
    assert md["ss_sd_model_name"] == "model.safetensors"
    adamw = torch.optim.AdamW
    assert md["ss_optimizer"] == f"{adamw.__module__}.{adamw.__name__}" == "torch.optim.adamw.AdamW"
    from dataclasses import replace
    assert optimizer_name(replace(config, weight_decay=0.05)) == "torch.optim.adamw.AdamW(weight_decay=0.05)"
    assert optimizer_name(replace(config, optimizer="adamw8bit")) == "bitsandbytes.optim.adamw.AdamW8bit"
    # every tensor in the save precision, the alphas included (kohya saves them so)
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(t.dtype == torch.float16 and float(t) == 1.0 for t in alphas)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    # the WebUI's Lora extension maps every module of the file
    matched, failed = match_keys(tensors, model)
    assert failed == {} and all(accepts_lora(e) for e in matched.values())

    unbucketed = replace(config, output_name="flat", buckets=False, steps=1, grad_accumulation=1)
    _, md = load_lora(train(unbucketed, LdmBackend(model)).output)
    # one 128x128 bucket for all: 10 images with repeats in 5 batches; kohya writes json.dumps(None)
    assert md["ss_bucket_info"] == "null" and md["ss_num_batches_per_epoch"] == "5" and md["ss_num_epochs"] == "1"
    assert md["ss_clip_skip"] == "None"

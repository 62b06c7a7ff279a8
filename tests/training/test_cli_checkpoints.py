"""``--checkpoint``: a diffusers-format folder (saved here from tiny components) and a single-file ldm checkpoint
(the stub WebUI's tiny model saved with a ``.yaml`` beside it, as the WebUI keeps custom configs) load offline
into the same numbers, and the command line trains on both."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")

from lib_adapters.errors import FormatError, MissingFileError  # noqa: E402
from lib_adapters.tiny_diffusers import tiny_clip_text_model, tiny_unet_config, tiny_vae_config  # noqa: E402
from lib_adapters.training import cli  # noqa: E402
from lib_adapters.training.loading import ModelSource, load_backend  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402
from lib_adapters.training.single_file import load_single_file  # noqa: E402


def write_tiny_clip_tokenizer(folder):
    """A real ``CLIPTokenizer`` over a byte-level vocabulary (no merges beyond two): vocab.json + merges.txt."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return folder


def _diffusers_folder(root):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(11)
    unet = UNet2DConditionModel(**tiny_unet_config())
    AutoencoderKL(**tiny_vae_config()).save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    tiny_clip_text_model(32).save_pretrained(root / "text_encoder")
    CLIPTokenizer(str(write_tiny_clip_tokenizer(root / "_tok") / "vocab.json"), str(root / "_tok" / "merges.txt"),
                  model_max_length=77).save_pretrained(root / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root, unet


def test_a_diffusers_folder_loads_offline_and_trains_through_the_command_line(tmp_path):
    folder, unet = _diffusers_folder(tmp_path / "model")
    backend = load_backend(ModelSource(folder), torch.device("cpu"))
    assert backend.parameterization.value == "v" and backend.arch.value == "SD1.x"
    assert all(torch.equal(a, b) for a, b in zip(backend.unet.state_dict().values(), unet.state_dict().values()))
    ids = backend.tokenizers[0](["a red circle"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 77) and int(ids[0, 0]) == backend.tokenizers[0].bos_token_id
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    out = io.StringIO()
    code = cli.main(["--checkpoint", str(folder), "--dataset", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "o"),
                     "--name", "f", "--resolution", "64", "--steps", "2", "--lora-rank", "2", "--device", "cpu"], out=out)
    assert code == cli.EXIT_OK, out.getvalue()
    tensors, metadata = load_lora(tmp_path / "o" / "f.safetensors")
    assert metadata["ss_sd_model_name"] == "model" and metadata["ss_base_model_version"] == "sd_v1_v"
    with pytest.raises(MissingFileError, match="unet/"):
        load_backend(ModelSource(tmp_path / "ds"), torch.device("cpu"))


def _single_file(tmp_path):
    """The stub WebUI's tiny SD1 model as an ldm single-file checkpoint, with its config in a .yaml beside it."""
    import yaml
    from safetensors.torch import save_file
    from tiny_model import build_tiny_sd_model

    model = build_tiny_sd_model("sd1", seed=2)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("cond_stage_model.wrapped."):
            key = "cond_stage_model." + key[len("cond_stage_model.wrapped."):]
        state[key] = value.contiguous().clone()
    path = tmp_path / "tiny-sd1.safetensors"
    save_file(state, str(path))
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=4, use_spatial_transformer=True,
                transformer_depth=1, context_dim=32, legacy=False)
    ddconfig = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    params = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, scale_factor=0.18215,
                  unet_config={"params": unet}, first_stage_config={"params": {"ddconfig": ddconfig}})
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
    return model, path


def test_a_single_file_checkpoint_loads_offline_into_the_same_numbers(tmp_path):
    from lib_adapters.training.backends.ldm import LdmBackend

    model, path = _single_file(tmp_path)
    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")
    dif = load_single_file(path, tokenizer_dir=tokenizer)
    ldm = LdmBackend(model)
    assert dif.parameterization.value == "eps" and dif.arch is ldm.arch and torch.equal(dif.alphas_cumprod, ldm.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = torch.randint(0, 990, (1, 77), generator=g)
    with torch.no_grad():
        assert torch.allclose(dif.apply(x, t, cond), ldm.apply(x, t, cond), atol=1e-4, rtol=1e-4)
        assert torch.allclose(dif.encode_images(pixels), ldm.encode_images(pixels), atol=1e-4, rtol=1e-4)
        text = model.cond_stage_model.wrapped.transformer(ids).last_hidden_state
        assert torch.allclose(dif.encoders[0](ids)[0], text, atol=1e-5)
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    out = io.StringIO()
    code = cli.main(["--checkpoint", str(path), "--tokenizer", str(tokenizer), "--dataset", str(tmp_path / "ds"),
                     "--output-dir", str(tmp_path / "o"), "--name", "s", "--resolution", "64", "--steps", "1",
                     "--lora-rank", "2", "--device", "cpu"], out=out)
    assert code == cli.EXIT_OK, out.getvalue()
    metadata = load_lora(tmp_path / "o" / "s.safetensors")[1]
    data = path.read_bytes()
    assert metadata["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()  # as kohya and the WebUI hash it
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_single_files_say_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    _, path = _single_file(tmp_path)
    with pytest.raises(MissingFileError, match="vocab.json and merges.txt.*--tokenizer"):
        load_single_file(path, tokenizer_dir=tmp_path / "empty")
    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "unet-only.safetensors"))
    with pytest.raises(FormatError, match="not an SD1.x, SD2.x or SDXL checkpoint"):
        load_single_file(tmp_path / "unet-only.safetensors", tokenizer_dir=tokenizer)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(FormatError, match="cannot read cut.safetensors"):
        load_single_file(tmp_path / "cut.safetensors", tokenizer_dir=tokenizer)


@pytest.mark.parametrize("given", [True, False])
def test_a_missing_tokenizer_exits_2_before_the_checkpoint_is_read(tmp_path, monkeypatch, capsys, given):
    from lib_adapters.training import single_file

    _, path = _single_file(tmp_path)
    reads = []
    monkeypatch.setattr(single_file, "read_checkpoint", lambda p: reads.append(p) or pytest.fail("checkpoint read"))
    monkeypatch.setattr(single_file, "_TOKENIZER_REPO", "nobody/no-such-tokenizer")  # not in the local HF cache
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=1)
    tokenizer = ["--tokenizer", str(tmp_path / "empty")] if given else []
    code = cli.main(["--checkpoint", str(path), *tokenizer, "--dataset", str(tmp_path / "ds"), "--output-dir",
                     str(tmp_path / "o"), "--name", "s", "--resolution", "64", "--steps", "1", "--device", "cpu"],
                    out=io.StringIO())
    error = capsys.readouterr().err
    assert code == cli.EXIT_INPUT and reads == [] and "vocab.json and merges.txt" in error and "--tokenizer" in error
    assert "Traceback" not in error

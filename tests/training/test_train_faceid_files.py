"""IP-Adapter FaceID training files: the released key layout (``image_proj.*``, ``ip_adapter.N.to_k_ip/to_v_ip``,
``ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight``) that our FaceID loader reads as variant FaceID with its LoRA,
and that diffusers' own FaceID loading reads to the last key (``_load_ip_adapter_weights``, then its
``_load_ip_adapter_loras`` and the LoRA loading ``load_ip_adapter`` goes on to) and computes, on SD1 and SDXL UNets,
what our training forward computes (<= 1e-4)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ColourFaces, half_colour_image, use_face_analyzer

from lib_adapters.formats.faceid import LORA_PARTS, load_faceid_adapter
from lib_adapters.models.faceid import FaceIDVariant
from lib_adapters.training.config import IPAdapterConfig, TrainConfig
from lib_adapters.training.methods.base import ExportInfo
from lib_adapters.training.methods.ip_adapter import IPAdapterMethod

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_train_diffusers import _pair  # noqa: E402  (the stub model, its ldm backend, a diffusers twin)
from test_train_ip_files import _Recording  # noqa: E402  (a state dict that remembers which keys were read)

RANK = 4


def _faces(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, colour in enumerate([(200, 40, 90), (20, 160, 230)]):
        paths.append(folder / f"{i}.png")
        half_colour_image(colour).save(paths[-1])
    return paths


def _perturbed_export(method: IPAdapterMethod, backend, path: Path) -> Path:
    """Every weight moved off its start (the LoRA's zero ``up`` included), as training would; exported in fp32."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    config = TrainConfig(path.parent, path.parent, path.stem, method="ip_adapter")
    return method.export(path, ExportInfo(config, backend.model_info(), 1, 1), torch.float32)


def _load_loras_as_diffusers_does(unet, loras: dict, monkeypatch) -> None:
    """What ``load_ip_adapter`` does with ``_load_ip_adapter_loras``'s dict: ``load_lora_weights(lora,
    adapter_name="faceid_0")``, which ends in ``unet.load_attn_procs`` (peft layers on to_q/to_k/to_v/to_out.0) at
    weight 1. diffusers enables that path only with transformers >= 4.34; the WebUI pins 4.30.2, whose text models
    this path never touches, so the gate is lifted here."""
    import diffusers.loaders.unet as loaders

    monkeypatch.setattr(loaders, "USE_PEFT_BACKEND", True)
    unet.load_attn_procs(loras, adapter_name="faceid_0")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_the_file_loads_in_our_loader_and_in_diffusers_with_our_numbers(arch, tmp_path, monkeypatch):
    use_face_analyzer(monkeypatch, ColourFaces())
    images = _faces(tmp_path / "faces")
    _, ldm, dif = _pair(arch)
    method = IPAdapterMethod(ldm, IPAdapterConfig(projection="faceid", lora_rank=RANK))
    twin = IPAdapterMethod(dif, IPAdapterConfig(projection="faceid", lora_rank=RANK))  # the same file from diffusers
    assert {k: v.shape for k, v in twin.trainable_state().items()} == {
        k: v.shape for k, v in method.trainable_state().items()}
    twin.close()
    path = _perturbed_export(method, ldm, tmp_path / "ip-adapter-faceid_mine.safetensors")
    sites = method.bound.ip_sites()
    embeds = method.features.get(images)
    with torch.no_grad():
        tokens = method.image_tokens(embeds)

    # our loader: variant FaceID, every processor's LoRA, the same tokens, keys/values and LoRA deltas
    ours = load_faceid_adapter(path)
    assert ours.variant is FaceIDVariant.FACEID and ours.tokens_per_face == 4
    assert sorted(ours.lora) == list(range(2 * len(sites))) and {r.rank for r in ours.lora.values()} == {RANK}
    assert (ours.tokens(embeds) - tokens).abs().max() <= 1e-6
    state = method.trainable_state()
    for n, lora in ours.lora.items():
        for part in LORA_PARTS:
            key = f"ip_adapter.{n}.to_{part}_lora"
            delta = state[f"{key}.up.weight"] @ state[f"{key}.down.weight"]
            assert torch.allclose(lora.delta(part), delta)
    assert all(torch.equal(ours.model.site(s.number).to_k_ip.weight, state[f"ip_adapter.{s.number}.to_k_ip.weight"])
               for s in sites)

    # diffusers: every key read (missing ones raise), the LoRA on every processor's q/k/v/out
    flat = load_file(str(path))
    nested = {part: _Recording({k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")})
              for part in ("image_proj", "ip_adapter")}
    assert sum(map(len, nested.values())) == len(flat)
    _, _, ref = _pair(arch)
    ref.unet._load_ip_adapter_weights([nested])
    loras = ref.unet._load_ip_adapter_loras([nested])
    assert nested["ip_adapter"].read == set(nested["ip_adapter"])  # zero unexpected keys
    assert nested["image_proj"].read == set(nested["image_proj"])
    assert list(loras) == [0] and len(loras[0]) == sum("_lora." in k for k in flat)
    _load_loras_as_diffusers_does(ref.unet, loras[0], monkeypatch)
    peft_layers = {name: m for name, m in ref.unet.named_modules() if hasattr(m, "lora_A") and "faceid_0" in m.lora_A}
    assert len(peft_layers) == 4 * 2 * len(sites)
    for name, layer in peft_layers.items():
        processor, part = name.rsplit(".to_", 1)
        key = f"unet.{processor}.processor.to_{part.split('.')[0]}_lora"
        expected = loras[0][key + ".up.weight"] @ loras[0][key + ".down.weight"]
        got = layer.lora_B["faceid_0"].weight @ layer.lora_A["faceid_0"].weight * layer.scaling["faceid_0"]
        assert torch.allclose(got, expected), name

    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
    with torch.no_grad():
        cond = ldm.encode_prompts(["a face", "a face"])
        with method.tokens_active(tokens):
            trained = ldm.apply(x, t, cond)
        method.close()
        base = ldm.apply(x, t, cond)
        context = cond["crossattn"] if isinstance(cond, dict) else cond  # the tiny SDXL UNet takes no vector
        theirs = ref.unet(x, t, encoder_hidden_states=context,
                          added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample  # [rows, 1 face, 512]
    assert (trained - base).abs().max() > 1e-2
    assert (trained - theirs).abs().max().item() <= 1e-4, (trained - theirs).abs().max()

"""A LoRA trained over diffusers components loads through diffusers' own ``load_lora_weights`` (its kohya key
conversion, ``LoraConfig`` from the file's ranks and alphas, and peft injection) with no unexpected or missing
keys, changes what the pipeline produces, and gives the same result as our own LoRA application.

diffusers 0.31 runs ``load_lora_weights`` only with its "PEFT backend", and its ``USE_PEFT_BACKEND`` flag
(``diffusers.utils.constants``) is ``peft >= 0.6 and transformers >= 4.34``. The WebUI pins transformers 4.30.2,
so the flag is False here although peft is installed. The transformers half of the condition matters to one
step only: the text encoder's LoRA goes in through ``text_encoder.load_adapter``, the PEFT integration that
transformers 4.34 added to ``PreTrainedModel``. The UNet half (``UNet2DConditionModel.load_attn_procs`` ->
``_process_lora``) uses peft alone (``inject_adapter_in_model``, ``set_peft_model_state_dict``), and none of the
loaders' modules imports transformers for it (``loaders/unet.py``, ``loaders/peft.py``, ``utils/peft_utils.py``).
So the test sets the flag to True in the diffusers modules that read it, and gives the transformers 4.30 text
encoder the few lines of transformers 4.34's ``load_adapter`` that diffusers relies on (peft's
``inject_adapter_in_model`` + ``set_peft_model_state_dict`` on the state dict and ``LoraConfig`` that diffusers
built); everything else is diffusers' code as a user with a newer transformers would run it.
"""
from __future__ import annotations

import sys

import pytest
import torch
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers' load_lora_weights injects LoRA layers with peft (requirements-test.txt)")

from lib_adapters.tiny_diffusers import WordHashTokenizer  # noqa: E402
from lib_adapters.training.config import LoraConfig, TrainConfig  # noqa: E402
from lib_adapters.training.loading import load_tiny  # noqa: E402
from lib_adapters.training.loop import train  # noqa: E402
from lib_adapters.training.methods.lora import LoraMethod  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402

LORA = LoraConfig(rank=4, alpha=2.0, targets="attention+ff+conv", train_text_encoder=True)  # fp16 file, as users get
PROMPT, NEGATIVE = "a red circle", "a blue square"


class _Tokenizer(WordHashTokenizer):
    """The tiny model's tokenizer with the surface the SD pipeline reads: ``.input_ids`` on what a call returns,
    and ``tokenize``/``added_tokens_encoder`` for its textual-inversion prompt check."""

    added_tokens_encoder: dict = {}

    def tokenize(self, text: str) -> list[str]:
        return text.split()

    def __call__(self, text, **kwargs):
        from transformers import BatchEncoding

        return BatchEncoding(super().__call__(text, **kwargs))


def _pipeline(backend):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=backend.vae, text_encoder=backend.encoders[0], tokenizer=_Tokenizer(),
                                   unet=backend._unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe):
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


def _text(pipe):
    with torch.no_grad():
        return pipe.text_encoder(pipe.tokenizer([PROMPT], return_tensors="pt").input_ids)[0]


def _enable_diffusers_peft_backend(monkeypatch, loads: list) -> None:
    """What diffusers would do with transformers >= 4.34 installed (see the module docstring)."""
    import peft

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "diffusers" and getattr(module, "USE_PEFT_BACKEND", None) is False:
            monkeypatch.setattr(module, "USE_PEFT_BACKEND", True)
    real = peft.set_peft_model_state_dict

    def recording(model, state, adapter_name="default", **kwargs):  # diffusers imports it from peft at call time
        result = real(model, state, adapter_name, **kwargs)
        loads.append((type(model).__name__, adapter_name, set(state), result))
        return result

    monkeypatch.setattr(peft, "set_peft_model_state_dict", recording)


def _transformers_434_load_adapter(model):
    """transformers 4.34's ``PeftAdapterMixin.load_adapter`` for a state dict and config passed in (its branch that
    diffusers' ``load_lora_into_text_encoder`` takes): inject, strip ``base_model.model.``, load the weights."""
    import peft

    def load_adapter(adapter_name=None, adapter_state_dict=None, peft_config=None, **_):
        adapter_name = adapter_name or "default"
        if adapter_name in getattr(model, "peft_config", {}):
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        peft.inject_adapter_in_model(peft_config, model, adapter_name)
        model._hf_peft_config_loaded = True
        prefix = "base_model.model."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in adapter_state_dict.items()}
        peft.set_peft_model_state_dict(model, state, adapter_name)

    return load_adapter


def _lora_problems(loads) -> list[str]:
    """Every unexpected key of each load, and its missing LoRA keys (diffusers' filter: the base weights are
    'missing' from an adapter state dict by design)."""
    problems = []
    for owner, adapter, _, result in loads:
        problems += [f"{owner}: unexpected {k}" for k in result.unexpected_keys]
        problems += [f"{owner}: missing {k}" for k in result.missing_keys if "lora_" in k and adapter in k]
    return problems


def test_diffusers_load_lora_weights_loads_a_trained_file(tmp_path, monkeypatch):
    from diffusers.utils import constants
    from peft.tuners.lora import LoraLayer

    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    config = TrainConfig(tmp_path / "ds", tmp_path / "out", "trained", resolution=64, steps=3, batch_size=2,
                         learning_rate=3e-3, lora=LORA)
    result = train(config, load_tiny(0))
    tensors, _ = load_lora(result.output)
    modules = {k.rsplit(".", 2)[0] for k in tensors}
    unet_modules = sum(m.startswith("lora_unet_") for m in modules)
    text_modules = sum(m.startswith("lora_te_") for m in modules)
    assert unet_modules > 0 and text_modules > 0 and unet_modules + text_modules == len(modules)

    base = _pipeline(load_tiny(0))
    base_latents, base_text = _latents(base), _text(base)

    ours_backend = load_tiny(0)
    ours_method = LoraMethod(ours_backend, LORA)
    ours_method.load_trainable_file(result.output)  # our own application: hooks adding up(down(x)) * alpha / rank
    ours = _pipeline(ours_backend)
    ours_latents, ours_text = _latents(ours), _text(ours)

    pipe = _pipeline(load_tiny(0))
    loads = []
    _enable_diffusers_peft_backend(monkeypatch, loads)
    if not constants._required_transformers_version:  # transformers < 4.34 has no PreTrainedModel.load_adapter
        monkeypatch.setattr(pipe.text_encoder, "load_adapter", _transformers_434_load_adapter(pipe.text_encoder),
                            raising=False)
    pipe.load_lora_weights(str(result.output), adapter_name="trained")

    assert [(owner, adapter) for owner, adapter, _, _ in loads] == [("UNet2DConditionModel", "trained"),
                                                                     ("CLIPTextModel", "trained")]
    assert _lora_problems(loads) == []
    assert [len({k.rsplit(".lora_", 1)[0] for k in state}) for _, _, state, _ in loads] == [unet_modules, text_modules]
    layers = {owner: [m for m in component.modules() if isinstance(m, LoraLayer)]
              for owner, component in (("unet", pipe.unet), ("text", pipe.text_encoder))}
    assert (len(layers["unet"]), len(layers["text"])) == (unet_modules, text_modules)
    assert all(layer.scaling["trained"] == 2.0 / 4 for group in layers.values() for layer in group)

    latents, text = _latents(pipe), _text(pipe)
    change = (latents - base_latents).abs().max().item()
    text_change = (text - base_text).abs().max().item()
    mismatch = (latents - ours_latents).abs().max().item()
    text_mismatch = (text - ours_text).abs().max().item()
    print(f"latents: LoRA changes {change:.3g} (scale {base_latents.abs().max().item():.3g}), diffusers vs ours "
          f"{mismatch:.3g}; text: changes {text_change:.3g}, diffusers vs ours {text_mismatch:.3g}")
    assert change > 1e-2 and text_change > 1e-2
    assert torch.allclose(latents, ours_latents, atol=1e-5, rtol=1e-4)
    assert torch.allclose(text, ours_text, atol=1e-5, rtol=1e-4)

    pipe.unet.disable_lora()  # diffusers' own switch: off gives the base model back
    with torch.no_grad():
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
        assert torch.equal(pipe.unet(x, t, base_text).sample, base.unet(x, t, base_text).sample)
    ours_method.close()

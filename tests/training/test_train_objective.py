"""Settings validation, the objective's formulas (noise, v target, min-SNR), schedules and optimizers, in numbers."""
from __future__ import annotations

import math

import pytest
import torch

from lib_adapters.errors import InputError
from lib_adapters.tiny import scaled_linear_alphas_cumprod
from lib_adapters.training.backends.base import Parameterization
from lib_adapters.training.config import LoraConfig, LoraTargets, LRSchedule, Precision, TrainConfig
from lib_adapters.training.objective import (add_noise, diffusion_loss, min_snr_weights, sample_noise,
                                             training_target, velocity)
from lib_adapters.training.optim import build_optimizer, lr_factor

AC = scaled_linear_alphas_cumprod()


def test_config_coerces_strings_and_rejects_bad_values(tmp_path):
    c = TrainConfig(tmp_path, tmp_path, "run", lr_schedule="cosine", precision="BF16",
                    lora=LoraConfig(targets="attention+ff"), save_precision="fp32")
    assert c.lr_schedule is LRSchedule.COSINE and c.precision is Precision.BF16
    assert c.lora.targets is LoraTargets.ATTENTION_FF and c.lora.targets.feed_forward and not c.lora.targets.conv
    bad = [dict(resolution=500), dict(steps=0), dict(learning_rate=float("nan")), dict(warmup_steps=2000),
           dict(lr_schedule="exponential"), dict(output_name="a/b"), dict(sample_every=10), dict(noise_offset=2.0),
           dict(min_snr_gamma=0), dict(batch_size=True)]
    messages = []
    for kwargs in bad:
        with pytest.raises(InputError) as info:
            TrainConfig(tmp_path, tmp_path, kwargs.pop("output_name", "run"), **kwargs)
        messages.append(str(info.value))
    assert "multiple of 64" in messages[0] and "steps must be an integer in 1.." in messages[1]
    assert "constant, cosine, linear" in messages[4] and "no sample prompts" in messages[6]
    with pytest.raises(InputError, match="rank"):
        LoraConfig(rank=0)
    assert LoraConfig(rank=8, alpha=4).scale == 0.5


def test_noise_and_v_target_match_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    noisy = add_noise(x0, eps, t, AC)
    v = training_target(Parameterization.V, x0, eps, t, AC)
    for i, ti in enumerate(t.tolist()):
        a = float(AC[ti])
        assert torch.allclose(noisy[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)
        assert torch.allclose(v[i], math.sqrt(a) * eps[i] - math.sqrt(1 - a) * x0[i], atol=1e-6)
    assert torch.equal(training_target(Parameterization.EPS, x0, eps, t, AC), eps)
    assert torch.equal(velocity(x0, eps, t, AC), v)
    # x0 is recovered from (noisy, v): x0 = sqrt(a) x_t - sqrt(1 - a) v
    a = AC[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, atol=1e-5)


def test_min_snr_weights_and_weighted_loss():
    t = torch.tensor([10, 400, 990])
    snr = AC[t].double() / (1 - AC[t].double())
    w_eps = min_snr_weights(t, AC, 5.0, Parameterization.EPS)
    w_v = min_snr_weights(t, AC, 5.0, Parameterization.V)
    assert torch.allclose(w_eps.double(), torch.clamp(snr, max=5) / snr, rtol=1e-6)
    assert torch.allclose(w_v.double(), torch.clamp(snr, max=5) / (snr + 1), rtol=1e-6)
    assert w_eps[0] < 0.1 and w_eps[2] == 1.0  # low noise (high SNR) is down-weighted; high noise untouched
    pred, target = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 4 + 9) / 3)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx((1 + 2) / 3)


def test_noise_offset_shifts_each_channel_by_one_draw():
    plain = sample_noise((2, 4, 16, 16), torch.Generator().manual_seed(1))
    offset = sample_noise((2, 4, 16, 16), torch.Generator().manual_seed(1), offset=0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant per sample and channel
    g = torch.Generator().manual_seed(1)
    torch.randn((2, 4, 16, 16), generator=g)
    assert torch.allclose(shift[:, :, :1, :1], 0.1 * torch.randn((2, 4, 1, 1), generator=g), atol=1e-7)


def test_lr_schedules_with_warmup():
    assert [lr_factor(LRSchedule.CONSTANT, s, 4, 20) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(LRSchedule.LINEAR, 4, 4, 20) == 1.0 and lr_factor(LRSchedule.LINEAR, 12, 4, 20) == 0.5
    assert lr_factor(LRSchedule.LINEAR, 20, 4, 20) == 0.0
    assert lr_factor(LRSchedule.COSINE, 12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(LRSchedule.COSINE, 8, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(LRSchedule.COSINE, 0, 0, 20) == 1.0


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except Exception:
        pass
    config = TrainConfig(tmp_path, tmp_path, "run", optimizer="adamw8bit")
    with pytest.raises(InputError, match="bitsandbytes"):
        build_optimizer(config, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])

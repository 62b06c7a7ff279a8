"""``out_of_place_augmented``: Forge's in-place residuals (``x += n`` after a norm saved ``x``) trainable through.

The real Forge main failed the first LoRA step with "one of the variables needed for gradient computation has
been modified by an inplace operation" in its transformer block; the mode turns augmented assignments into
out-of-place operations while gradients are on, and leaves explicit in-place calls alone.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lib_adapters.training.backends.augmented import out_of_place_augmented

torch.manual_seed(0)
NORM1, NORM2, LINEAR = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
for frozen in (NORM1, NORM2):
    frozen.requires_grad_(False)


def forge_block(x: torch.Tensor) -> torch.Tensor:
    """Forge's residual pattern: x saved by a norm, then added to in place."""
    n = LINEAR(NORM1(x))
    x += n
    n = NORM2(x).sin()
    x += n
    x_skip = x
    x = x * 0.5
    x *= 2.0
    x -= 0.25
    x /= 2.0
    x += x_skip
    return x.sin()  # saves x: a checkpoint's recomputation runs past the in-place ops above


def ldm_block(x: torch.Tensor) -> torch.Tensor:
    """The same arithmetic written out of place (ldm, A1111)."""
    x = x + LINEAR(NORM1(x))
    x = x + NORM2(x).sin()
    return (((x * 0.5 * 2.0 - 0.25) / 2.0) + x).sin()


def grads(block, wrap=lambda f, x: f(x), mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and the gradient of LINEAR's weight; ``mode``: the forward (only, as the trainer's
    ``apply``) in ``out_of_place_augmented``, the backward outside it."""
    LINEAR.zero_grad()
    x = torch.linspace(-1, 1, 32).reshape(4, 8) * 1.0
    if mode:
        with out_of_place_augmented():
            y = wrap(block, x)
    else:
        y = wrap(block, x)
    (y ** 2).sum().backward()
    return y.detach(), LINEAR.weight.grad.clone()


def test_forge_residuals_fail_under_autograd_without_the_mode():
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(forge_block)


def test_in_the_mode_the_gradients_are_those_of_the_out_of_place_block():
    y_ref, g_ref = grads(ldm_block)
    y, g = grads(forge_block, mode=True)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)


def test_checkpointed_recomputation_gets_the_mode_through_context_fn():
    y_ref, g_ref = grads(ldm_block)
    context = lambda: (out_of_place_augmented(), out_of_place_augmented())  # noqa: E731
    # the recomputation in backward runs outside the forward's mode: its in-place residuals change tensors it
    # saved, and no error says so (the checkpoint keeps detached copies): the gradient is silently wrong
    _, wrong = grads(forge_block, lambda f, x: checkpoint(f, x, use_reentrant=False), mode=True)
    assert not torch.allclose(wrong, g_ref, atol=1e-3)
    y, g = grads(forge_block, lambda f, x: checkpoint(f, x, use_reentrant=False, context_fn=context), mode=True)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)


def test_explicit_in_place_calls_and_no_grad_code_stay_in_place():
    x = torch.zeros(3)
    alias = x
    with out_of_place_augmented():
        x.add_(1.0)  # an explicit call: its result may be discarded, so it must stay in place
        assert alias is x and torch.equal(alias, torch.ones(3))
        with torch.no_grad():
            x += 1.0  # gradients off: in place as Forge means it
        assert alias is x and torch.equal(alias, torch.full((3,), 2.0))
        x += 1.0  # gradients on: a new tensor, the old one left as it was
    assert alias is not x and torch.equal(alias, torch.full((3,), 2.0)) and torch.equal(x, torch.full((3,), 3.0))

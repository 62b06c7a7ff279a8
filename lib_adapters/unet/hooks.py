"""Reversible, chaining forward wrappers.

``PatchSet.wrap(module, make)`` replaces ``module.forward`` on the instance with
``make(current_forward)``, where ``current_forward`` is whatever was in effect at install time
(the class forward, or another extension's instance wrapper). ``restore()`` puts back exactly
what was there, newest first. If someone wrapped the same module after us, removing our layer
would drop theirs, so our layer is switched to a transparent pass-through instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

log = logging.getLogger(__name__)

Forward = Callable[..., Any]


@dataclass
class _Patch:
    module: nn.Module
    had_instance_forward: bool
    previous_instance_forward: Forward | None
    current: Forward
    wrapper: Forward | None = None
    active: bool = True


@dataclass
class PatchSet:
    """The wrappers of one generation; restore them in ``finally``."""

    _patches: list[_Patch] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._patches)

    def wrap(self, module: nn.Module, make: Callable[[Forward], Forward]) -> None:
        had = "forward" in module.__dict__
        patch = _Patch(module, had, module.__dict__.get("forward"), module.forward)
        inner = make(patch.current)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not patch.active:
                return patch.current(*args, **kwargs)
            return inner(*args, **kwargs)

        patch.wrapper = forward
        module.forward = forward
        self._patches.append(patch)

    def restore(self) -> None:
        """Undo every wrapper, newest first; safe to call twice."""
        while self._patches:
            patch = self._patches.pop()
            patch.active = False
            module = patch.module
            if module.__dict__.get("forward") is not patch.wrapper:
                log.warning("%s.forward was wrapped again by someone else; leaving a pass-through layer",
                            type(module).__name__)
                continue
            if patch.had_instance_forward:
                module.forward = patch.previous_instance_forward
            else:
                del module.__dict__["forward"]

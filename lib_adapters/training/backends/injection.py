"""How a T2I-Adapter's features reach a UNet whose blocks are called as modules (ldm/sgm, diffusers).

``inject_features(unet, features)`` adds ``features[level]`` (fitted to ``h`` by ``inference.t2i.fit_feature``,
as a panel unit does) where the panel's T2I units add theirs, for the UNet calls made inside the block:

* ldm/sgm UNets (the WebUI's model): forward wrappers (``unet.hooks.PatchSet``) on the sites of
  ``unet.layout``'s table, after the block and before its skip connection is stored;
* diffusers UNets: the UNet's own ``down_intrablock_additional_residuals`` input, which adds at the
  same places (after the level's last block, before the skip is stored; after the middle block).

It is ``TrainingBackend.t2i_features``'s default; a backend whose host runs the blocks' layers itself (Forge)
brings its own.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ...inference.t2i import fit_feature
from ...unet.hooks import Forward, PatchSet
from ...unet.layout import bind_layout


@contextlib.contextmanager
def inject_features(unet: nn.Module, features: list[torch.Tensor]) -> Iterator[None]:
    """Add ``features[level]`` at each T2I site of ``unet`` for the calls made inside the block."""
    patches = PatchSet()
    try:
        if hasattr(unet, "input_blocks"):
            bound = bind_layout(unet)
            for level, site in enumerate(bound.layout.t2i_sites):
                patches.wrap(bound.module(site.path), _site_wrapper(features[level]))
        else:
            patches.wrap(unet, _diffusers_wrapper(features))
        yield
    finally:
        patches.restore()


def _site_wrapper(feature: torch.Tensor):
    def make(forward: Forward) -> Forward:
        def site(*args: Any, **kwargs: Any) -> Any:
            h = forward(*args, **kwargs)
            return h + fit_feature(feature, h).to(h.dtype)
        return site
    return make


def _diffusers_wrapper(features: list[torch.Tensor]):
    def make(forward: Forward) -> Forward:
        def unet_forward(*args: Any, **kwargs: Any) -> Any:
            # diffusers pops the list as it goes: a fresh one per call
            return forward(*args, down_intrablock_additional_residuals=list(features), **kwargs)
        return unet_forward
    return make

"""Fake of ``modules/sd_hijack_unet.py``'s ``TorchHijackForUnet``: the real ``sd_hijack`` sets
``ldm.modules.diffusionmodules.openaimodel.th`` to it at import, so a decoder block's input and a
skip of odd size are interpolated to match instead of crashing (latent sizes not divisible by 8)."""
from __future__ import annotations

import torch


class TorchHijackForUnet:
    def __getattr__(self, item):
        if item == "cat":
            return self.cat
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = torch.nn.functional.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return torch.cat(tensors, *args, **kwargs)


th = TorchHijackForUnet()


def install() -> None:
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    openaimodel.th = th

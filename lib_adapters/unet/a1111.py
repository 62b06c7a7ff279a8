"""The A1111 host binding: a generation's ``UNetPoints`` wired into an ldm/sgm UNet by forward wrappers.

``install()`` wraps module forwards on the instance (``hooks.PatchSet``: chained onto whatever
forward is current, another extension's included) and patches weights:

- the entry module (``layout.entry``), always: its output tells the latent size, and the call's
  rows come from ``points.take_rows`` (the WebUI's CFG denoiser announced them); that is the
  ``UNetCall`` every point of this call gets;
- each T2I site, when a unit adds residuals: ``h + points.residual(level, h, call)``;
- every attn2, when a unit adds context tokens or attention: the context becomes
  ``points.context(...)``, the current forward runs (the WebUI's attention implementation computes
  the text attention) while a forward hook on ``to_q`` catches its query for exactly this input,
  and ``points.attention(...)`` is added to its output;
- each Linear with a delta in ``points.weight_deltas()``: its output gets ``x @ delta^T`` added (a
  ``LowRankDelta`` as two thin matmuls), so it computes as if its weight were ``weight + delta``.

The weights themselves are never written. Writing ``weight + delta`` in place would break the WebUI's
built-in Lora extension whenever a LoRA of the prompt is active in the same generation: it merges its
LoRAs into the weights on the first forward, after backing the weights up once
(``network_weights_backup``, taken from whatever the weight is then, i.e. with our delta in it) and
remembering what it merged (``network_current_names``). Our restore would then put back a weight
without its LoRA while it believes the LoRA merged, and its backup would bring our delta back the
next time its set of LoRAs changes: the model would stay altered. Added at the output, our delta
composes with whatever the layer's forward does (its class forward patched by the Lora extension,
merged or functional), and the model's tensors are the same objects with the same values after.

``restore()`` puts back exactly what was there; safe to call twice.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Forward, PatchSet
from .layout import IPSite
from .points import FORWARD_DELTA, LowRankDelta, Point, UNetCall, UNetPoints, WeightDelta


class A1111Binding:
    """The wrappers and weight patches of one generation; ``restore`` them in ``finally`` (or use ``with``)."""

    def __init__(self, points: UNetPoints):
        self.points = points
        self._patches = PatchSet()
        self._marked: list[nn.Module] = []  # layers carrying FORWARD_DELTA while their delta is added
        self._call: UNetCall | None = None

    @property
    def installed(self) -> bool:
        return len(self._patches) > 0

    def install(self) -> None:
        points = self.points
        if self.installed or not any(points.uses(p) for p in Point):
            return
        bound = points.bound
        self._patches.wrap(bound.module(bound.layout.entry), self._wrap_entry)
        if points.uses(Point.RESIDUAL):
            for level, site in enumerate(bound.layout.t2i_sites):
                self._patches.wrap(bound.module(site.path), self._site_wrapper(level))
        if points.uses(Point.CONTEXT) or points.uses(Point.ATTENTION):
            for ip_site in bound.ip_sites():
                module = bound.module(ip_site.path)
                self._patches.wrap(module, self._attn2_wrapper(ip_site, module))
        if points.uses(Point.WEIGHTS):
            self._add_weight_deltas()

    def restore(self) -> None:
        self._patches.restore()
        while self._marked:
            self._marked.pop().__dict__.pop(FORWARD_DELTA, None)
        self._call = None

    def __enter__(self) -> "A1111Binding":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # weights ---------------------------------------------------------------------------------
    def _add_weight_deltas(self) -> None:
        """Each Linear with a weight delta adds ``delta(x)`` to its output (see the module docstring for why)."""
        unet = self.points.bound.unet
        for path, delta in self.points.weight_deltas().items():
            module_path, _, name = path.rpartition(".")
            layer = unet.get_submodule(module_path)
            if not isinstance(layer, nn.Linear) or name != "weight" or getattr(delta, "shape", None) is None \
                    or tuple(delta.shape) != tuple(layer.weight.shape):
                raise ValueError(f"the A1111 binding adds weight deltas to Linear weights of their shape only; got "
                                 f"{path} ({type(layer).__name__}) and a delta of shape {tuple(delta.shape)}")
            self._patches.wrap(layer, self._delta_wrapper(layer, delta))
            layer.__dict__[FORWARD_DELTA] = delta
            self._marked.append(layer)

    @staticmethod
    def _delta_wrapper(layer: nn.Linear, delta: WeightDelta) -> Callable[[Forward], Forward]:
        def make(forward: Forward) -> Forward:
            moved: dict[tuple, WeightDelta] = {}  # the delta on the input's device, in the layer's dtype: once

            def linear(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                out = forward(x, *args, **kwargs)
                key = (x.device, layer.weight.dtype)
                if key not in moved:
                    moved[key] = delta.to(*key)
                d = moved[key]
                term = d.apply(x.to(d.up.dtype)) if isinstance(d, LowRankDelta) else F.linear(x.to(d.dtype), d)
                return out + term.to(out.dtype)

            return linear

        return make

    # wrappers --------------------------------------------------------------------------------
    def _wrap_entry(self, forward: Forward) -> Forward:
        def entry(*args: Any, **kwargs: Any) -> Any:
            h = forward(*args, **kwargs)
            rows = self.points.take_rows(int(h.shape[0]), h)
            self._call = UNetCall(latent_hw=(int(h.shape[-2]), int(h.shape[-1])), cond_mask=rows)
            return h

        return entry

    def _site_wrapper(self, level: int) -> Callable[[Forward], Forward]:
        def make(forward: Forward) -> Forward:
            def site(*args: Any, **kwargs: Any) -> Any:
                h = forward(*args, **kwargs)
                call = self._call
                residual = None if call is None else self.points.residual(level, h, call)
                return h if residual is None else h + residual

            return site

        return make

    def _attn2_wrapper(self, site: IPSite, attn: nn.Module) -> Callable[[Forward], Forward]:
        points = self.points

        def make(forward: Forward) -> Forward:
            def attn2(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                call = self._call
                if kwargs.get("context") is not None:
                    kwargs["context"] = points.context(kwargs["context"], call)
                if not points.attends(site):
                    return forward(x, *args, **kwargs)  # the text attention, as the WebUI computes it
                with capture_query(attn, x) as captured:
                    out = forward(x, *args, **kwargs)
                added = points.attention(site, attn, x, captured.get("q"), call)
                return out if added is None else out + added.to(out.dtype)

            return attn2

        return make


@contextlib.contextmanager
def capture_query(attn: nn.Module, x: torch.Tensor) -> Iterator[dict]:
    """While the text attention runs, keep what ``attn.to_q`` returns for exactly this ``x``."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        if inputs and inputs[0] is x and "q" not in captured:
            captured["q"] = output

    handle = attn.to_q.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()

"""The Forge host binding: a generation's ``UNetPoints`` registered on a clone of Forge's ``UnetPatcher``.

Forge (main and Classic) keeps the UNet behind a patcher that extensions clone and patch before every
sampling pass; the clone is set as ``p.sd_model.forge_objects.unet`` and Forge resets ``forge_objects``
before the next pass, so the shared module is never touched and discarding the clone is the restore
(forge-host-api.md, sections 1 and 4). Instance forward wrappers, as ``a1111.py`` uses, are not an
option: Forge Classic runs the blocks' layers directly, so wrappers on ``input_blocks[i]`` never fire.

``ForgeBinding.patch(unet_patcher)`` returns a clone carrying, for the points the session uses:

- a block modifier: after the UNet block of a T2I site (Forge calls it after its own ControlNet
  residuals and before the skip connection is stored, as the A1111 wrapper's output is),
  ``h + points.residual(level, h, call)``;
- an attn2 patch (called with the normed input ``to_q`` will receive, the context and the value):
  the units' tokens appended to the context and the value, and the input kept in the block call's
  ``extra_options`` for the output patch;
- an attn2 output patch (after ``to_out``, bias included): ``+ points.attention(site, attn, input,
  None, call)``;
- the weight deltas as one weight patch (``add_patches``), which Forge merges when it loads the
  clone and takes back when it loads another patcher of the same model: a ``LowRankDelta`` (the LoRA of
  a FaceID model) as Forge's own ``"lora"`` patch, kept factored as Forge keeps a prompt's LoRA (the
  patch holds rank * (in + out) values; the dense ``up @ down`` exists only while Forge merges that one
  weight), a dense delta as a ``"diff"`` patch. Both Forge main (``LoraLoader.refresh``) and Classic
  (``patch_model``/``unpatch_model``) back up the weight they replace and put exactly that back, and a
  prompt LoRA's patches on the same weight merge in the same pass (their sum, as on A1111).

The attn2 *replace* slot is never written: Forge's own IP-Adapter owns it, and its replacement
attends to the context our attn2 patch extended, then our output patch adds on top. Every other
patch list is appended to, so Forge's ControlNet and IP-Adapter (or anyone) patching the same
generation chain with ours in any order. ``UNetCall`` comes from the call's ``transformer_options``:
the latent size from ``original_shape``, the cond rows from ``cond_mark`` (1.0 marks uncond rows;
Forge batches uncond first). Progress comes from the host's CFG callback (``session.on_progress``).

The callables are closures: Forge deep-copies ``model_options`` on every clone, which copies a bound
method's whole instance but shares a function. ``close()`` turns them into no-ops (the clone stays in
``forge_objects`` until Forge's next reset). Nothing here imports Forge; the patcher is duck-typed.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import re
from typing import Any, Callable

import torch
from torch import nn

from ..errors import IncompatibleModelError
from .layout import IPSite
from .points import LowRankDelta, Point, UNetCall, UNetPoints, WeightDelta

log = logging.getLogger(__name__)

MARK = "_adapters_extension_patch"  # attribute on our closures: a clone of a clone can drop them before re-adding
WEIGHTS_PREFIX = "adapters-extension/"  # the "filename" of our weight patch on Forge main
_INPUT_KEY = "adapters_attn2_input"  # in one block call's extra_options: attn2's input, for the output patch
_generations = itertools.count(1)

BlockKey = tuple  # Forge's transformer_options["block"]: ("input", 4), ("middle", 0), ("output", 3)
_IP_PATH = re.compile(r"(?:(input|output)_blocks\.(\d+)|middle_block)\.\d+\.transformer_blocks\.(\d+)\.attn2")


class OurWeightPatch(tuple):
    """A weight patch value as Forge's patchers merge it, marked as ours so a re-patched clone can drop it:
    ``(delta,)`` ("diff": ``weight + delta``) or ``("lora", (up, down, alpha, mid, dora_scale))`` ("lora":
    ``weight + alpha / rank * up @ down``, alpha None meaning 1; Classic reads the first four)."""


def weight_patch(delta: WeightDelta) -> OurWeightPatch:
    """Forge's patch value for one of our deltas: a LoRA stays factored (its scale folded into ``up``)."""
    if isinstance(delta, LowRankDelta):
        up = delta.up.detach() if delta.scale == 1.0 else delta.up.detach().float() * delta.scale
        return OurWeightPatch(("lora", (up, delta.down.detach(), None, None, None)))
    return OurWeightPatch((delta.detach(),))


def block_key(path: str) -> BlockKey:
    """Forge's block key of a UNet block path of the layout ("input_blocks.5" -> ("input", 5))."""
    if path == "middle_block":
        return ("middle", 0)
    kind, _, index = path.partition("_blocks.")
    return (kind, int(index))


def attn2_key(path: str) -> tuple[str, int, int]:
    """(block kind, block number, depth index in its spatial transformer) of an IP site's attn2 path."""
    m = _IP_PATH.fullmatch(path)
    if m is None:
        raise IncompatibleModelError(f"'{path}' is not an attn2 inside a UNet block's spatial transformer")
    kind, number, depth = m.groups()
    return (kind or "middle", int(number or 0), int(depth))


class ForgeBinding:
    """One generation's points, ready to be registered on any number of patcher clones (Forge calls
    ``process_before_every_sampling`` once per pass, twice in main's hires pass)."""

    def __init__(self, points: UNetPoints):
        self.points = points
        bound = points.bound
        self._levels = {block_key(site.path): level for level, site in enumerate(bound.layout.t2i_sites)}
        self._attn2: dict[tuple[str, int, int], tuple[IPSite, nn.Module]] = {
            attn2_key(site.path): (site, bound.module(site.path)) for site in bound.ip_sites()}
        self._weights_name = f"{WEIGHTS_PREFIX}generation-{next(_generations)}"  # unique: Forge compares names
        self._weights: dict[str, OurWeightPatch] | None = None
        self._closed = False
        self._memo: tuple | None = None
        self._warned_rows = False

    @property
    def active(self) -> bool:
        return not self._closed and any(self.points.uses(p) for p in Point)

    def close(self) -> None:
        """The generation is over: the registered closures pass everything through from now on."""
        self._closed = True
        self._memo = None
        self._weights = None

    def patch(self, unet_patcher: Any) -> Any:
        """A clone of ``unet_patcher`` with this generation's points registered (``unet_patcher`` itself
        unchanged), or ``unet_patcher`` when no point is in use."""
        if not self.active:
            return unet_patcher
        if getattr(getattr(unet_patcher, "model", None), "diffusion_model", None) is not self.points.bound.unet:
            raise IncompatibleModelError("the UNet of this sampling pass is not the one the units were built for (a "
                                         "refiner or a hires checkpoint?); the adapters skip this pass")
        clone = unet_patcher.clone()
        drop_ours(clone)
        points = self.points
        if points.uses(Point.WEIGHTS):
            self._add_weights(clone)
        if points.uses(Point.RESIDUAL):
            clone.add_block_modifier(_ours(self._block_modifier()))
        if points.uses(Point.CONTEXT) or points.uses(Point.ATTENTION):
            clone.set_model_attn2_patch(_ours(self._attn2_patch()))
        if points.uses(Point.ATTENTION):
            clone.set_model_attn2_output_patch(_ours(self._attn2_output_patch()))
        return clone

    # the call in progress ------------------------------------------------------------------------
    def _call(self, options: dict, like: torch.Tensor) -> UNetCall:
        """The latent size and cond rows of the UNet call ``options`` belongs to, for tensors like ``like``."""
        shape = options.get("original_shape")
        latent_hw = (int(shape[-2]), int(shape[-1])) if shape is not None else None
        mark = options.get("cond_mark")
        memo = self._memo
        if memo is not None and memo[0] is mark and memo[1] == latent_hw and memo[2] == (like.dtype, like.device):
            return memo[3]
        cond_mask = None
        if isinstance(mark, torch.Tensor):
            if mark.shape[0] == like.shape[0]:
                cond_mask = (1 - mark).to(like.device, like.dtype)
            elif not self._warned_rows:
                log.warning("Forge marked %d rows in a UNet call of %d rows; treating all as cond", mark.shape[0],
                            like.shape[0])
                self._warned_rows = True
        call = UNetCall(latent_hw=latent_hw, cond_mask=cond_mask)
        self._memo = (mark, latent_hw, (like.dtype, like.device), call)
        return call

    # the patches ----------------------------------------------------------------------------------
    def _block_modifier(self) -> Callable:
        points, levels = self.points, self._levels

        def block_modifier(h: torch.Tensor, flag: str, transformer_options: dict) -> torch.Tensor:
            if flag != "after" or self._closed:
                return h
            level = levels.get(transformer_options.get("block"))
            if level is None:
                return h
            residual = points.residual(level, h, self._call(transformer_options, h))
            return h if residual is None else h + residual.to(h.dtype)

        return block_modifier

    def _attn2_patch(self) -> Callable:
        points = self.points
        extends = points.uses(Point.CONTEXT)
        keeps_input = points.uses(Point.ATTENTION)

        def attn2_patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
            if self._closed:
                return n, context, value
            if extends and context is not None:
                call = self._call(extra_options, n)
                extended = points.context(context, call)
                value = extended if value is context else points.context(value, call)
                context = extended
            if keeps_input:
                extra_options[_INPUT_KEY] = n  # exactly what attn2.to_q receives (the replace slot's too)
            return n, context, value

        return attn2_patch

    def _attn2_output_patch(self) -> Callable:
        points, sites = self.points, self._attn2

        def attn2_output_patch(n: torch.Tensor, extra_options: dict) -> torch.Tensor:
            x = extra_options.pop(_INPUT_KEY, None)
            if self._closed or x is None:
                return n
            block = extra_options.get("block")
            found = sites.get((block[0], int(block[1]), int(extra_options.get("block_index", 0)))) if block else None
            if found is None or not points.attends(found[0]):
                return n
            site, attn = found
            added = points.attention(site, attn, x, None, self._call(extra_options, x))
            return n if added is None else n + added.to(n.dtype)

        return attn2_output_patch

    def _add_weights(self, clone: Any) -> None:
        if self._weights is None:
            self._weights = {f"diffusion_model.{path}": weight_patch(delta)
                             for path, delta in self.points.weight_deltas().items()}
        if not self._weights:
            return
        if "filename" in inspect.signature(clone.add_patches).parameters:  # Forge main: keyword-only, named
            accepted = clone.add_patches(filename=self._weights_name, patches=self._weights, strength_patch=1.0,
                                         strength_model=1.0)
        else:  # Forge Classic (and ComfyUI): positional
            accepted = clone.add_patches(self._weights, 1.0, 1.0)
        missing = sorted(set(self._weights) - set(accepted))
        if missing:
            raise IncompatibleModelError(f"Forge's UNet has no parameter {missing[0]} ({len(missing)} weight patches "
                                         "refused); the adapters skip this pass")


def _ours(fn: Callable) -> Callable:
    setattr(fn, MARK, True)
    return fn


def drop_ours(clone: Any) -> None:
    """Remove every patch this extension registered from ``clone`` (a clone of a clone that already carried
    ours, as in Forge main's first, discarded hires call), so registering again never doubles them."""
    options = clone.model_options.setdefault("transformer_options", {})
    for name in ("block_modifiers",):
        if name in options:
            options[name] = [fn for fn in options[name] if not getattr(fn, MARK, False)]
    for name, patches in list(options.get("patches", {}).items()):
        options["patches"][name] = [fn for fn in patches if not getattr(fn, MARK, False)]
    lora_patches = getattr(clone, "lora_patches", None)  # Forge main: {(filename, ...): {key: [...]}}
    if isinstance(lora_patches, dict):
        for identifier in [k for k in lora_patches if isinstance(k, tuple) and str(k[0]).startswith(WEIGHTS_PREFIX)]:
            del lora_patches[identifier]
    weight_patches = getattr(clone, "patches", None)  # Forge Classic: {key: [(strength, value, strength_model)]}
    if isinstance(weight_patches, dict):
        for key in list(weight_patches):
            kept = [entry for entry in weight_patches[key] if not isinstance(entry[1], OurWeightPatch)]
            if kept:
                weight_patches[key] = kept
            else:
                del weight_patches[key]

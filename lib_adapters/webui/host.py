"""Which WebUI the extension runs in: AUTOMATIC1111, Forge (main) or Forge Classic, told once at start.

The facts (forge-host-api.md, section 8): every Forge ships the package ``modules_forge``, A1111 does
not. Forge Classic (and Forge builds before the Gradio 4 rewrite, which share its structure) keeps the
ComfyUI-derived ``ldm_patched`` package and writes ``"classic"`` in ``modules_forge/forge_version.py``;
Forge main replaced it by its own ``backend`` package (``backend.patcher.unet.UnetPatcher``). Only module
*specs* are looked up (plus the one-line version module), so detecting imports nothing of the host's
model code.

On both Forges a generation's UNet is a ``UnetPatcher`` at ``p.sd_model.forge_objects.unet`` that
extensions clone and patch in ``process_before_every_sampling`` (``unet/forge.py``); on A1111 the
UNet module is ``p.sd_model.model.diffusion_model``, wrapped in ``process`` (``unet/a1111.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import AdapterError

log = logging.getLogger("adapters")


class HostKind(str, Enum):
    A1111 = "AUTOMATIC1111 WebUI"
    FORGE = "Forge"
    FORGE_CLASSIC = "Forge Classic"


@dataclass(frozen=True)
class Host:
    kind: HostKind
    version: str = ""  # Forge's own version string ("2.0.1v1.10.1", "classic"); "" on A1111

    @property
    def is_forge(self) -> bool:
        return self.kind is not HostKind.A1111

    def unet_module(self, p: Any) -> Any:
        """The generation's UNet ``nn.Module`` (the same object for every clone of Forge's patcher)."""
        if not self.is_forge:
            return p.sd_model.model.diffusion_model
        return forge_unet_patcher(p).model.diffusion_model


def _has_module(name: str) -> bool:
    """Whether ``name`` can be imported; a dotted name imports its parents, which may not be packages."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def _forge_version() -> str:
    try:
        return str(getattr(importlib.import_module("modules_forge.forge_version"), "version", ""))
    except Exception:  # an unreadable version module must not stop the extension from loading
        return ""


def detect() -> Host:
    """Look the host up now (``current()`` caches it)."""
    if not _has_module("modules_forge"):
        return Host(HostKind.A1111)
    version = _forge_version()
    if version == "classic" or _has_module("ldm_patched"):
        return Host(HostKind.FORGE_CLASSIC, version)
    if not _has_module("backend.patcher.unet"):
        log.warning("Adapters: modules_forge found but neither ldm_patched nor backend.patcher.unet; assuming Forge "
                    "(main) %s", version)
    return Host(HostKind.FORGE, version)


_current: Host | None = None


def current() -> Host:
    """The host, detected on first use and kept for the life of the process."""
    global _current
    if _current is None:
        _current = detect()
        log.info("Adapters: running on %s %s", _current.kind.value, _current.version)
    return _current


def forget() -> None:
    """Detect again on the next ``current()`` (tests switch hosts in one process)."""
    global _current
    _current = None


def forge_unet_patcher(p: Any) -> Any:
    """Forge's current UNet patcher for this generation, or an error saying why there is none."""
    objects = getattr(p.sd_model, "forge_objects", None)
    unet = getattr(objects, "unet", None)
    if unet is None:
        raise AdapterError("Forge has no model loaded for this generation (p.sd_model.forge_objects.unet is missing); "
                           "load a Stable Diffusion checkpoint and generate again.")
    return unet

"""The Adapters panel: the WebUI's side of ``lib_adapters.inference``.

``script`` (the AlwaysVisible script: the accordion's units, preview, and the process hooks), ``generation``
(the controller that turns the units into a session wired into the WebUI's UNet, and ends it),
``settings`` (the Settings page, read as a typed snapshot), ``infotext`` (units in the image's
parameters and back). Here: the resources the txt2img and img2img scripts share (model catalog, caches),
which the training tab also reaches, to refresh the model list after it publishes an adapter; importing
this package loads no gradio.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...catalog import EncoderCatalog, ModelCatalog
from ...inference.cache import MB, AdapterCache
from ...inference.encodings import EncodingCache
from ...inference.faces import FaceAnalyzers, FaceService
from ...inference.units import NO_MODEL
from ...preprocess.registry import PreprocessorCache
from . import settings


@dataclass
class SharedResources:
    """Process-wide caches of files read from disk and of encoder outputs, shared by the txt2img and
    img2img scripts so a model is loaded once; emptied when the WebUI unloads the scripts, loads
    another checkpoint, or runs on another device."""

    catalog: ModelCatalog
    encoders: EncoderCatalog
    adapters: AdapterCache
    preprocessors: PreprocessorCache
    encodings: EncodingCache = field(default_factory=EncodingCache)
    face_analyzers: FaceAnalyzers = field(default_factory=FaceAnalyzers)
    scanned: bool = False
    host: tuple[str, str] | None = None  # (checkpoint, device) the caches were filled for

    def model_choices(self, refresh: bool = False) -> list[str]:
        if refresh or not self.scanned:
            self.catalog.refresh()
            self.scanned = True
        return [NO_MODEL] + self.catalog.names()

    def faces(self, cfg: settings.PanelSettings) -> FaceService:
        """Face analysis for FaceID units with the Settings' pack and device (the analyzers are kept)."""
        return FaceService(cfg.models_dir, self.face_analyzers, self.encodings, cfg.face_pack, cfg.face_device)

    def clear(self) -> None:
        self.adapters.clear()
        self.encodings.clear()
        self.preprocessors.clear()  # the face analyzers stay: they do not depend on the checkpoint

    def bind_host(self, host: tuple[str, str]) -> None:
        """Empty the caches when the generation runs on another checkpoint or device than the last one (a
        model reload also empties them, through ``on_model_loaded``; this catches any other change)."""
        if self.host is not None and host != self.host:
            self.clear()
        self.host = host


_resources: SharedResources | None = None


def resources() -> SharedResources:
    global _resources
    cfg = settings.current()
    if _resources is None or tuple(_resources.catalog.own_folders) != cfg.model_dirs:
        _resources = SharedResources(ModelCatalog(cfg.model_dirs, cfg.shared_model_dirs),
                                     EncoderCatalog(cfg.encoder_dirs), AdapterCache(cfg.cache_budget_mb * MB),
                                     PreprocessorCache())
    _resources.adapters.set_budget(cfg.cache_budget_mb * MB)
    return _resources


def release_resources() -> None:
    if _resources is not None:
        _resources.clear()
        _resources.face_analyzers.clear()
        _resources.host = None


def host_of(p: Any) -> tuple[str, str]:
    """What the cached models and encoder outputs were made for: the checkpoint and the WebUI's device."""
    from modules import devices

    model = p.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    checkpoint = getattr(info, "filename", None) or getattr(model, "sd_model_checkpoint", None) or ""
    return str(checkpoint), str(getattr(devices, "device", "cpu"))


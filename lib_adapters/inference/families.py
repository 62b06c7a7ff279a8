"""The registry of adapter families: from a unit's file to its runtime, keyed by the family detected from keys.

A unit's file is loaded through the model cache (``formats/adapter_file.py`` reads it and picks the
loader by ``formats/detect.py``'s signature table); the loaded adapter says its detected family, and
the one ``Family`` registered for it builds the runtime (``build.Family.build``). So a new adapter
family is its own module here (a ``UnitRuntime`` subclass answering the points it acts at, a builder
and a ``FAMILY``), its detection entry in formats (a signature and a loader), and its line below,
as a network type is in the WebUI's Lora extension (a ``ModuleType`` per file, one ordered list).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsupportedModelError
from ..formats.detect import ModelFamily
from . import faceid, ip, style, t2i
from .build import BuildContext, Family
from .runtime import UnitRuntime
from .units import AdapterUnit

FAMILIES: tuple[Family, ...] = (t2i.FAMILY, style.FAMILY, ip.FAMILY, faceid.FAMILY)
_BY_DETECTED = {detected: family for family in FAMILIES for detected in family.detected}


def family_for(detected: ModelFamily) -> Family:
    family = _BY_DETECTED.get(detected)
    if family is None:
        raise UnsupportedModelError(f"{detected.value} files cannot be used in the Adapters panel; pick a "
                                    f"{', '.join(f.name for f in FAMILIES)} file.")
    return family


@dataclass(frozen=True)
class BuiltUnit:
    runtime: UnitRuntime
    family: Family
    fields: tuple[str, ...]  # what its infotext holds
    written: AdapterUnit  # the unit as its infotext writes it (defaults the family resolved filled in)


def build_runtime(ctx: BuildContext, label: str, unit: AdapterUnit, file: Path) -> BuiltUnit:
    """The unit's runtime for this generation (the file loaded through the model cache), its family and infotext."""
    adapter = ctx.models.load_adapter(file)
    family = family_for(adapter.family)
    runtime = family.build(ctx, label, unit, adapter, file)
    fields, written = family.infotext(unit, adapter, ctx)
    return BuiltUnit(runtime, family, fields, written)

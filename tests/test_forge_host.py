"""Telling A1111, Forge (main) and Forge Classic apart (lib_adapters/webui/host.py), and where each keeps the UNet."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_adapters.errors import AdapterError
from lib_adapters.webui import host
from lib_adapters.webui.host import Host, HostKind
from stubs_forge.webui import HOSTS, _purge_host_modules
from test_architecture import ROOT, _imports

HOST_PACKAGES = {"modules_forge", "backend", "ldm_patched"}


@pytest.fixture()
def on_path():
    added = []

    def add(folder: Path) -> None:
        _purge_host_modules()
        sys.path.insert(0, str(folder))
        added.append(str(folder))

    yield add
    for folder in added:
        if folder in sys.path:
            sys.path.remove(folder)
    _purge_host_modules()
    host.forget()


def _package(root: Path, name: str, **files: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    for stem, text in files.items():
        (folder / f"{stem}.py").write_text(text)


def test_a1111_without_forge_packages():
    assert host.detect() == Host(HostKind.A1111)


def test_forge_main_and_classic(on_path):
    on_path(HOSTS / "main")
    assert host.detect() == Host(HostKind.FORGE, "2.0.1v1.10.1")
    sys.path.remove(str(HOSTS / "main"))
    on_path(HOSTS / "classic")
    assert host.detect() == Host(HostKind.FORGE_CLASSIC, "classic")


def test_classic_by_version_or_by_ldm_patched_and_odd_layouts(on_path, tmp_path, caplog):
    """Forge builds before the Gradio 4 rewrite have ldm_patched and a numeric version: Classic's structure."""
    old = tmp_path / "old"
    _package(old, "modules_forge", forge_version="version = '0.0.17v1.8.0rc'\n")
    _package(old, "ldm_patched")
    on_path(old)
    assert host.detect() == Host(HostKind.FORGE_CLASSIC, "0.0.17v1.8.0rc")
    sys.path.remove(str(old))
    odd = tmp_path / "odd"
    _package(odd, "modules_forge")  # no version module, no backend package
    (odd / "backend.py").write_text("")  # some other top-level module named backend
    on_path(odd)
    assert host.detect() == Host(HostKind.FORGE, "")
    assert "assuming Forge" in caplog.text


def test_current_is_detected_once_and_forgotten_on_request(on_path):
    host.forget()
    assert host.current().kind is HostKind.A1111
    on_path(HOSTS / "classic")
    assert host.current().kind is HostKind.A1111  # kept for the life of the process
    host.forget()
    assert host.current().kind is HostKind.FORGE_CLASSIC


def test_where_the_unet_module_is():
    module = object()
    a1111 = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=module)))
    patcher = SimpleNamespace(model=SimpleNamespace(diffusion_model=module))
    forge = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher)))
    assert Host(HostKind.A1111).unet_module(a1111) is module
    assert Host(HostKind.FORGE).unet_module(forge) is module
    assert Host(HostKind.FORGE_CLASSIC).unet_module(forge) is module
    with pytest.raises(AdapterError, match="forge_objects"):
        Host(HostKind.FORGE).unet_module(a1111)


def test_units_are_skipped_when_forge_has_no_model(tmp_path):
    """Forge main before its first model load has a FakeInitialModel without forge_objects."""
    from lib_adapters.catalog import EncoderCatalog, ModelCatalog
    from lib_adapters.inference.cache import AdapterCache
    from lib_adapters.preprocess.registry import PreprocessorCache
    from lib_adapters.webui.panel.generation import GenerationController

    controller = GenerationController(ModelCatalog([tmp_path]), AdapterCache(), PreprocessorCache(), tmp_path,
                                      EncoderCatalog([]), host=Host(HostKind.FORGE, "2.0.1v1.10.1"))
    comments = []
    p = SimpleNamespace(sd_model=SimpleNamespace(), extra_generation_params={}, comment=comments.append)
    controller.start(p, [{"enabled": True, "model": "depth", "image": None}])
    assert controller.session is None
    assert "forge_objects" in p.extra_generation_params["Adapter 1 skipped"] and comments


def test_neither_the_core_nor_the_glue_imports_a_host_package():
    """Only names are looked up (host.py); no module imports Forge's packages."""
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in HOST_PACKAGES)
                 for p in (ROOT / "lib_adapters").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}

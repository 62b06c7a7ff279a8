"""install.py through the WebUI's launch helpers (stubbed: they record instead of installing)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import launch  # tests/stubs/launch.py

ROOT = Path(__file__).resolve().parents[1]
# controlnet-aux 0.0.10's Requires-Dist, as the METADATA of its published wheel lists them (no version bounds,
# no markers); everything but the OpenCV is what it needs besides the WebUI's own cv2
CONTROLNET_AUX_0_0_10_REQUIRES = ("torch", "importlib_metadata", "huggingface_hub", "scipy", "opencv-python-headless",
                                  "filelock", "numpy", "Pillow", "einops", "torchvision", "timm", "scikit-image")
NEEDED_BESIDES_OPENCV = [name for name in CONTROLNET_AUX_0_0_10_REQUIRES if not name.startswith("opencv")]


def _run_installer(monkeypatch, installed: set[str], fail: bool = False):
    calls = []

    def run_pip(command, desc=None, live=False):
        constraints = command.split('-c "')[1].rstrip('"')
        calls.append((command, Path(constraints).read_text()))
        if fail:
            raise RuntimeError("pip failed: ResolutionImpossible")

    monkeypatch.setattr(launch, "is_installed", lambda name: name in installed)
    monkeypatch.setattr(launch, "run_pip", run_pip)
    spec = importlib.util.spec_from_file_location("adapters_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return calls


def test_installs_only_what_is_missing_pinning_the_webui_packages(monkeypatch):
    calls = _run_installer(monkeypatch, installed={"diffusers"})
    assert [c[0].split('"')[1] for c in calls] == ["controlnet-aux==0.0.10"]
    pins = calls[0][1].split()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("numpy==") for p in pins)
    assert any(p.startswith("transformers==") for p in pins)


def test_nothing_to_do_when_everything_is_installed(monkeypatch):
    assert _run_installer(monkeypatch, installed={"diffusers", "controlnet-aux"}) == []


def test_a_failed_install_is_reported_not_fatal(monkeypatch, capsys):
    calls = _run_installer(monkeypatch, installed=set(), fail=True)
    assert len(calls) == 2
    assert "could not install controlnet-aux" in capsys.readouterr().out


def _packages(calls) -> list[list[str]]:
    return [c[0].split('-c "')[0].split('"')[1::2] for c in calls]


def test_controlnet_aux_never_adds_a_second_opencv(monkeypatch):
    """The WebUI has opencv-python; controlnet-aux asks for opencv-python-headless, which writes the same cv2."""
    present = {"diffusers", "opencv-python", "torch", "torchvision", "numpy", "Pillow", "scipy", "scikit-image",
               "huggingface_hub", "filelock", "importlib_metadata"}
    calls = _run_installer(monkeypatch, installed=present)
    assert [c[0].split('-c "')[0].strip() for c in calls] == [
        'install "controlnet-aux==0.0.10" --no-deps', 'install "einops" "timm"']
    assert not any("opencv" in c[0] for c in calls)
    pins = calls[0][1].split()  # the WebUI's OpenCV stays exactly as installed (when the test venv has one)
    for name in ("opencv-python", "opencv-python-headless"):
        if _installed_version(name):
            assert f"{name}=={_installed_version(name)}" in pins


def test_with_every_requirement_present_only_controlnet_aux_itself_is_added(monkeypatch):
    calls = _run_installer(monkeypatch, installed={"diffusers", "opencv-contrib-python", *NEEDED_BESIDES_OPENCV})
    assert _packages(calls) == [["controlnet-aux==0.0.10"]] and "--no-deps" in calls[0][0]


def test_without_any_opencv_pip_resolves_controlnet_aux_as_usual(monkeypatch):
    calls = _run_installer(monkeypatch, installed={"diffusers", "torch", "numpy"})
    assert [c[0].split('-c "')[0].strip() for c in calls] == ['install "controlnet-aux==0.0.10"']


def test_the_dependency_list_is_controlnet_aux_0_0_10s_without_opencv(monkeypatch):
    spec = importlib.util.spec_from_file_location("adapters_install_constants", ROOT / "install.py")
    monkeypatch.setattr(launch, "is_installed", lambda name: True)  # nothing to install: main() returns at once
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.CONTROLNET_AUX_DEPENDENCIES) == NEEDED_BESIDES_OPENCV
    if _installed_version("controlnet-aux") == "0.0.10":  # the test environment has it: its metadata says the same
        declared = [r.split(";")[0].split("[")[0].strip() for r in importlib.metadata.requires("controlnet-aux")]
        assert declared == list(CONTROLNET_AUX_0_0_10_REQUIRES)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

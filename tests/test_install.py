"""install.py through the WebUI's launch helpers (stubbed: they record instead of installing)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest

import launch  # tests/stubs/launch.py

ROOT = Path(__file__).resolve().parents[1]
# controlnet-aux 0.0.10's Requires-Dist, as the METADATA of its published wheel lists them (no version bounds,
# no markers); everything but the OpenCV is what it needs besides the WebUI's own cv2
CONTROLNET_AUX_0_0_10_REQUIRES = ("torch", "importlib_metadata", "huggingface_hub", "scipy", "opencv-python-headless",
                                  "filelock", "numpy", "Pillow", "einops", "torchvision", "timm", "scikit-image")
NEEDED_BESIDES_OPENCV = [name for name in CONTROLNET_AUX_0_0_10_REQUIRES if not name.startswith("opencv")]
HAVE_ORT = {"onnxruntime"}  # the other tests' environments already have face analysis


def _fake_torch(monkeypatch, cuda: str | None, cudnn: int | None) -> None:
    """``import torch`` inside install.py gets a build with this CUDA and cuDNN (torch's own attributes)."""
    backends = types.SimpleNamespace(cudnn=types.SimpleNamespace(version=lambda: cudnn))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda),
                                                                    backends=backends))


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
    monkeypatch.setitem(sys.modules, spec.name, module)  # as `python install.py` has its __main__ (dataclasses look there)
    spec.loader.exec_module(module)
    return calls


def test_installs_only_what_is_missing_pinning_the_webui_packages(monkeypatch):
    calls = _run_installer(monkeypatch, installed={"diffusers", *HAVE_ORT})
    assert [c[0].split('"')[1] for c in calls] == ["controlnet-aux==0.0.10"]
    pins = calls[0][1].split()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("numpy==") for p in pins)
    assert any(p.startswith("transformers==") for p in pins)


def test_nothing_to_do_when_everything_is_installed(monkeypatch):
    assert _run_installer(monkeypatch, installed={"diffusers", "controlnet-aux", *HAVE_ORT}) == []


def test_a_failed_install_is_reported_not_fatal(monkeypatch, capsys):
    _fake_torch(monkeypatch, cuda=None, cudnn=None)
    calls = _run_installer(monkeypatch, installed=set(), fail=True)
    assert len(calls) == 3
    out = capsys.readouterr().out
    assert "could not install controlnet-aux" in out and "could not install onnxruntime>=1.16" in out


def _packages(calls) -> list[list[str]]:
    return [c[0].split('-c "')[0].split('"')[1::2] for c in calls]


def test_controlnet_aux_never_adds_a_second_opencv(monkeypatch):
    """The WebUI has opencv-python; controlnet-aux asks for opencv-python-headless, which writes the same cv2."""
    present = {"diffusers", *HAVE_ORT, "opencv-python", "torch", "torchvision", "numpy", "Pillow", "scipy", "scikit-image",
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
    calls = _run_installer(monkeypatch, installed={"diffusers", *HAVE_ORT, "opencv-contrib-python", *NEEDED_BESIDES_OPENCV})
    assert _packages(calls) == [["controlnet-aux==0.0.10"]] and "--no-deps" in calls[0][0]


def test_without_any_opencv_pip_resolves_controlnet_aux_as_usual(monkeypatch):
    calls = _run_installer(monkeypatch, installed={"diffusers", *HAVE_ORT, "torch", "numpy"})
    assert [c[0].split('-c "')[0].strip() for c in calls] == ['install "controlnet-aux==0.0.10"']


def test_the_dependency_list_is_controlnet_aux_0_0_10s_without_opencv(monkeypatch):
    spec = importlib.util.spec_from_file_location("adapters_install_constants", ROOT / "install.py")
    monkeypatch.setattr(launch, "is_installed", lambda name: True)  # nothing to install: main() returns at once
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert list(module.CONTROLNET_AUX_DEPENDENCIES) == NEEDED_BESIDES_OPENCV
    if _installed_version("controlnet-aux") == "0.0.10":  # the test environment has it: its metadata says the same
        declared = [r.split(";")[0].split("[")[0].strip() for r in importlib.metadata.requires("controlnet-aux")]
        assert declared == list(CONTROLNET_AUX_0_0_10_REQUIRES)


EVERYTHING_BUT_ORT = {"diffusers", "controlnet-aux", "opencv-python", "torch", "numpy"}


@pytest.mark.parametrize("cuda, cudnn, expected", [
    (None, None, "onnxruntime>=1.16"),                   # CPU, ROCm or macOS torch: the CPU wheel
    ("12.4", 90100, "onnxruntime-gpu>=1.19,<1.24"),          # torch 2.4+cu124 ships cuDNN 9.1 (version 90100)
    ("11.8", 8700, "onnxruntime-gpu>=1.16,<1.19"),       # torch cu118 + cuDNN 8.7: onnxruntime-gpu's CUDA 11.8 builds
    ("12.1", 8902, "onnxruntime>=1.16"),                 # the WebUI 1.10's torch 2.1.2+cu121, cuDNN 8.9: no PyPI GPU build
    ("12.1", None, "onnxruntime>=1.16"),                 # cuDNN missing or not loadable
    ("13.0", 91300, "onnxruntime>=1.16"),                # a CUDA no onnxruntime-gpu on PyPI is known to match
])
def test_onnxruntime_for_the_webuis_torch(monkeypatch, cuda, cudnn, expected):
    _fake_torch(monkeypatch, cuda, cudnn)
    calls = _run_installer(monkeypatch, installed=EVERYTHING_BUT_ORT)
    assert _packages(calls) == [[expected]]
    pins = calls[0][1].split()  # installed under the same constraints: numpy and protobuf stay as the WebUI has them
    assert any(p.startswith("numpy==") for p in pins)
    if _installed_version("protobuf"):
        assert f"protobuf=={_installed_version('protobuf')}" in pins


@pytest.mark.parametrize("present", ["onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"])
def test_any_installed_onnxruntime_is_kept_and_torch_is_not_imported(monkeypatch, present):
    """They all write the one `onnxruntime` package: adding a second would overwrite the first's files."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises: install.py must not need it here
    assert _run_installer(monkeypatch, installed=EVERYTHING_BUT_ORT | {present}) == []


def test_the_fallback_to_the_cpu_wheel_says_why(monkeypatch, capsys):
    _fake_torch(monkeypatch, "12.1", 8902)
    _run_installer(monkeypatch, installed=EVERYTHING_BUT_ORT)
    out = capsys.readouterr().out
    assert "CUDA 12.1 with cuDNN 8" in out and "CPU onnxruntime" in out


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

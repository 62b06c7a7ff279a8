"""install.py through the WebUI's launch helpers (stubbed: they record instead of installing)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import launch  # tests/stubs/launch.py

ROOT = Path(__file__).resolve().parents[1]


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

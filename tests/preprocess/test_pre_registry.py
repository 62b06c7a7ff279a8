"""The preprocessor table, weight-file handling (missing, unsafe, corrupt) and the local load path."""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lib_adapters.errors import AdapterError, FormatError, InputError, MissingFileError
from lib_adapters.preprocess import (
    CONDITION_KINDS,
    PreprocessorCache,
    get_preprocessor,
    list_preprocessors,
    run_preprocessor,
)
from lib_adapters.preprocess.loading import build_detector, hub_offline
from lib_adapters.preprocess.spec import DetectorSpec

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPECTED_WEIGHT_FILES = {
    "depth_midas": ("dpt_hybrid-midas-501f0c75.pt",),
    "depth_zoe": ("ZoeD_M12_N.pt",),
    "openpose": ("body_pose_model.pth",),
    "openpose_full": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    "sketch_pidinet": ("table5_pidinet.pth",),
    "scribble_pidinet": ("table5_pidinet.pth",),
    "hed": ("ControlNetHED.pth",),
    "scribble_hed": ("ControlNetHED.pth",),
    "lineart": ("sk_model.pth",),
    "lineart_coarse": ("sk_model2.pth",),
    "lineart_anime": ("netG.pth",),
}
# no annotator weights (``face`` draws what the FaceID unit's face models find; the caller passes its finder)
WEIGHT_FREE = {"none", "invert", "canny", "threshold", "color_grid", "face"}


@pytest.fixture
def no_network(monkeypatch):
    """Make every outgoing connection fail loudly, and fail the test if one was attempted."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a preprocessor test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network was attempted: {attempts}"


def image() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- the table

def test_table_is_immutable_and_consistent():
    table = list_preprocessors()
    assert isinstance(table, tuple) and table is list_preprocessors()
    names = [p.name for p in table]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        table[0].name = "changed"  # type: ignore[misc]
    for p in table:
        assert set(p.suggested_for) <= set(CONDITION_KINDS)
        assert p.needs_weights == bool(p.weight_files)
        for slider in (p.threshold_a, p.threshold_b):
            if slider is not None:
                assert slider.minimum <= slider.default <= slider.maximum
    assert {p.name for p in table if not p.needs_weights} == WEIGHT_FREE
    # Every condition kind has at least one suggestion besides "none" where a detector exists.
    for kind in CONDITION_KINDS:
        assert any(kind in p.suggested_for for p in table)


def test_weight_files_are_the_exact_names_the_detectors_open():
    assert {p.name: p.weight_files for p in list_preprocessors() if p.needs_weights} == EXPECTED_WEIGHT_FILES


def test_canny_defaults_match_the_reference():
    canny = get_preprocessor("canny")
    assert (canny.threshold_a.default, canny.threshold_b.default) == (100, 200)
    assert canny.resolution == 512
    assert get_preprocessor("none").resolution is None


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(InputError) as info:
        get_preprocessor("depth_leres_plus_plus")
    for p in list_preprocessors():
        assert p.name in str(info.value)
    with pytest.raises(InputError):
        run_preprocessor("nope", image())


@pytest.mark.parametrize(("alias", "name"), [("t2ia_color_grid", "color_grid"), ("CANNY", "canny"),
                                             ("t2ia_sketch_pidi", "sketch_pidinet"), (" hed ", "hed")])
def test_sd_webui_controlnet_aliases(alias, name):
    assert get_preprocessor(alias).name == name


# ----------------------------------------------------------------------------- missing weights

@pytest.mark.parametrize("name", sorted(EXPECTED_WEIGHT_FILES))
def test_missing_weights_name_file_folder_and_source(name, tmp_path, no_network):
    with pytest.raises(MissingFileError) as info:
        run_preprocessor(name, image(), weights_dir=tmp_path)
    message = str(info.value)
    for filename in EXPECTED_WEIGHT_FILES[name]:
        assert filename in message
    assert str(tmp_path) in message
    assert "lllyasviel/Annotators" in message and "huggingface.co" in message
    assert os.listdir(tmp_path) == []  # nothing was written or downloaded into the folder


def test_missing_folder_and_unconfigured_folder(tmp_path, no_network):
    absent = tmp_path / "annotators"
    with pytest.raises(MissingFileError, match="does not exist"):
        run_preprocessor("hed", image(), weights_dir=absent)
    assert not absent.exists()
    with pytest.raises(MissingFileError, match="no annotator weights folder"):
        run_preprocessor("hed", image(), weights_dir=None)
    with pytest.raises(MissingFileError, match="ControlNetHED.pth"):
        PreprocessorCache().get("scribble_hed", None)


def test_partially_present_files_name_only_the_missing_ones(tmp_path, no_network):
    (tmp_path / "body_pose_model.pth").write_bytes(b"not read: the check happens first")
    with pytest.raises(MissingFileError) as info:
        PreprocessorCache().get("openpose_full", tmp_path)
    message = str(info.value)
    assert "hand_pose_model.pth" in message and "facenet.pth" in message
    assert "body_pose_model.pth" not in message


# ----------------------------------------------------------------------------- local load path

torch = pytest.importorskip("torch")


def save_random_pidinet(folder: Path) -> None:
    """A PiDiNet checkpoint in the released layout: {'state_dict': {'module.<key>': tensor}}."""
    with warnings.catch_warnings():  # controlnet-aux's import warns about optional extras
        warnings.simplefilter("ignore")
        from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in pidinet().state_dict().items()}
    torch.save({"state_dict": state}, folder / "table5_pidinet.pth")


def test_pidinet_loads_from_a_local_folder_and_runs(tmp_path, no_network):
    save_random_pidinet(tmp_path)
    before = os.environ.get("HF_HUB_OFFLINE")
    cache = PreprocessorCache()
    out = run_preprocessor("sketch_pidinet", image(), resolution=64, weights_dir=tmp_path, cache=cache)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert os.environ.get("HF_HUB_OFFLINE") == before  # the offline switch was restored

    # scribble_pidinet shares the loaded network; the same detector comes back from the cache.
    detector = cache.get("sketch_pidinet", tmp_path)
    assert cache.get("scribble_pidinet", tmp_path) is detector and len(cache) == 1
    # 100 is not a multiple of 64 (the detectors' working grid): the size is still exact.
    scribble = run_preprocessor(
        "scribble_pidinet", image(), resolution=100, weights_dir=tmp_path, cache=cache
    )
    assert scribble.shape == (100, 150, 3) and len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.get("sketch_pidinet", tmp_path) is not detector
    assert cache.get("canny", tmp_path) is None


class Marker:
    """A class the weights-only unpickler must refuse to rebuild."""


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"state_dict": Marker()}, "pickled code"),
        (b"\x00garbage, not a checkpoint", "corrupt"),
        ({"state_dict": {"module.wrong.weight": torch.zeros(1)}}, "does not fit"),
        ({"no_state_dict": 1}, "state_dict"),
    ],
)
def test_unsafe_corrupt_or_wrong_files_raise_format_error(payload, needle, tmp_path, no_network):
    path = tmp_path / "table5_pidinet.pth"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(FormatError, match=needle) as info:
        run_preprocessor("sketch_pidinet", image(), weights_dir=tmp_path)
    assert str(path) in str(info.value)


def test_hub_offline_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ


def test_importing_the_package_loads_no_detector():
    code = "import sys, lib_adapters.preprocess; print('controlnet_aux' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def failing_spec(error: Exception) -> DetectorSpec:
    def build(paths, device):
        raise error

    return DetectorSpec("fake", ("fake.pth",), "nowhere", "https://example.invalid", build)


@pytest.mark.parametrize(
    ("error", "needle"),
    [(ImportError("No module named 'timm'"), "pip install controlnet-aux"), (ValueError("boom"), "boom")],
)
def test_build_failures_become_adapter_errors(error, needle, tmp_path):
    (tmp_path / "fake.pth").write_bytes(b"")
    with pytest.raises(AdapterError, match=needle) as info:
        build_detector(failing_spec(error), tmp_path, "fake", "cpu")
    assert info.value.__cause__ is error


def test_a_detector_failing_at_run_time_fails_as_adapter_error(tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    class BrokenCache(PreprocessorCache):
        def get(self, name, weights_dir):
            return broken

    with pytest.raises(AdapterError, match="'hed' failed: RuntimeError: CUDA out of memory"):
        run_preprocessor("hed", image(), weights_dir=tmp_path, cache=BrokenCache())

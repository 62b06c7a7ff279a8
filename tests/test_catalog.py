"""Which files the panel lists, and how a listed name resolves back to a file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fixtures.adapters import diffusers_adapter, save_both_layouts
from lib_adapters.catalog import ModelCatalog
from lib_adapters.errors import MissingFileError


@pytest.fixture()
def folders(tmp_path):
    own, shared = tmp_path / "adapters", tmp_path / "ControlNet"
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=0), own, "depth")
    (own / "annotators").mkdir()
    torch.save({"w": torch.zeros(1)}, own / "annotators" / "body_pose_model.pth")
    _, st = save_both_layouts(diffusers_adapter("full_adapter", 1, seed=1), shared, "t2iadapter_canny")
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(1)}, str(shared / "control_depth.safetensors"))
    torch.save({"w": torch.zeros(1)}, shared / "control_sd15_openpose.pth")
    return own, shared


def test_lists_own_folder_and_only_adapters_from_the_shared_one(folders):
    catalog = ModelCatalog([folders[0]], [folders[1]])
    names = catalog.refresh()
    assert names == ["depth", "depth_diffusers", "t2iadapter_canny", "t2iadapter_canny_diffusers"]


def test_resolves_names_as_written_in_infotext(folders):
    catalog = ModelCatalog([folders[0]], [folders[1]])
    catalog.refresh()
    path = catalog.resolve("depth [0123abcd]")
    assert path == folders[0] / "depth.pth"
    assert len(catalog.short_hash(path)) == 8 and catalog.short_hash(path) == catalog.short_hash(path)


def test_missing_model_names_the_folders(folders):
    catalog = ModelCatalog([folders[0]], [folders[1]])
    with pytest.raises(MissingFileError, match="'lineart' not found.*adapters.*ControlNet"):
        catalog.resolve("lineart")


def test_model_added_later_is_found_without_restart(folders):
    catalog = ModelCatalog([folders[0]])
    catalog.refresh()
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=3), folders[0], "new_one")
    assert catalog.resolve("new_one") == folders[0] / "new_one.pth"


def _controlnet_model_hash(path) -> str:
    """How sd-webui-controlnet names a model, re-implemented from reading its source (not copied), at commit
    56cec5b2958edf3b1807b7e7b2b1b5186dbd2f81: ``scripts/global_state.py`` ``get_all_models`` lists every model
    file as ``f"{name} [{sd_models.model_hash(filename)}]"``, and the infotext writes that list entry; the WebUI's
    ``modules/sd_models.py`` ``model_hash`` opens the file, seeks to 0x100000, hashes the next 0x10000 bytes
    with sha256 and keeps the first 8 hex digits (a file shorter than 1 MiB hashes an empty read)."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(1024 * 1024)
        block = f.read(64 * 1024)
    return hashlib.sha256(block).hexdigest()[0:8]


def _fixed_file(path, size: int) -> None:
    """Deterministic bytes (not random per run): the same file, and hash, on every machine."""
    import numpy as np

    path.write_bytes(np.random.default_rng(20240725).integers(0, 256, size, dtype=np.uint8).tobytes())


def test_short_hash_is_the_one_sd_webui_controlnet_shows(tmp_path):
    from lib_adapters.catalog import model_short_hash
    from modules import sd_models  # the stub WebUI's model_hash, written from the WebUI's source

    big, small = tmp_path / "t2iadapter_depth.safetensors", tmp_path / "tiny.pth"
    _fixed_file(big, 1_300_000)
    _fixed_file(small, 1000)
    catalog = ModelCatalog([tmp_path])
    for path in (big, small):
        assert catalog.short_hash(path) == model_short_hash(path) == _controlnet_model_hash(path) \
            == sd_models.model_hash(str(path))
    assert catalog.short_hash(big) == "b51f67f8"  # pinned: the algorithm must not drift
    assert catalog.short_hash(small) == "e3b0c442"  # sha256 of nothing, as both WebUI extensions show it
    full_sha256 = __import__("hashlib").sha256(big.read_bytes()).hexdigest()[:8]
    assert catalog.short_hash(big) != full_sha256  # what our infotext showed before


def test_names_resolve_with_either_hash_and_renamed_files_by_theirs(tmp_path):
    import hashlib

    from lib_adapters.webui.panel import infotext

    own = tmp_path / "adapters"
    depth, _ = save_both_layouts(diffusers_adapter("full_adapter", 3, seed=0), own, "depth")
    catalog = ModelCatalog([own])
    catalog.refresh()
    ours_now, ours_before = catalog.short_hash(depth), hashlib.sha256(depth.read_bytes()).hexdigest()[:8]
    for written in (f"depth [{ours_now}]", f"depth [{ours_before}]", "depth", f"depth [{ours_now.upper()}]"):
        assert catalog.resolve(written) == depth
        params = {"Adapter 1": f"Model: {written}, Weight: 0.5"}
        infotext.on_infotext_pasted("", params)
        assert params["Adapter 1 Model"] == "depth"
    assert catalog.resolve(f"t2iadapter_depth_sd15v2 [{ours_now}]") == depth  # the same file under its other name
    with pytest.raises(MissingFileError, match="'t2iadapter_depth_sd15v2' not found"):
        catalog.resolve(f"t2iadapter_depth_sd15v2 [{ours_before}]")  # the old full-file hash is not searched
    with pytest.raises(MissingFileError):
        catalog.resolve("t2iadapter_depth_sd15v2 [e3b0c442]")  # the hash every file under 1 MiB has: no match

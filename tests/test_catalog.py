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

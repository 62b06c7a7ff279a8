"""The stub WebUI with the tiny SD1 model, the built-in Lora extension (stub ``networks``) and a small dataset."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

LORA_EXTENSION = Path(__file__).resolve().parents[1] / "stubs" / "extensions-builtin" / "Lora"
TRAINING_HELPERS = Path(__file__).resolve().parents[1] / "training"
for _path in (LORA_EXTENSION, TRAINING_HELPERS):  # as the WebUI puts an extension's folder on sys.path
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def webui(tmp_path):
    import driver
    import networks
    from modules import call_queue, progress, shared
    from train_helpers import make_shapes_dataset

    driver.reset_webui(tmp_path / "webui")
    torch.manual_seed(0)
    model = driver.load_tiny_model("sd1")
    networks.install()
    progress.pending_tasks.clear()
    progress.finished_tasks.clear()
    progress.current_task = None
    dataset = make_shapes_dataset(tmp_path / "dataset", "2_shapes")
    try:
        yield SimpleNamespace(model=model, networks=networks, shared=shared, progress=progress,
                              queue_lock=call_queue.queue_lock, dataset=dataset, root=tmp_path / "webui",
                              lora_dir=Path(shared.cmd_opts.lora_dir))
    finally:
        networks.uninstall()
        shared.loaded_hypernetworks.clear()
        assert not call_queue.queue_lock.locked(), "a test left the queue lock held"

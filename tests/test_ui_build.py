"""The Adapters panel and the Train Adapter tab build under the Gradio that is installed: 3.41 in the test venv
(A1111 1.10, Forge Classic), 4.40 in the Forge venv of ``tests/run_gradio4.sh`` (Forge main).

The stub WebUI, like the real one, reports an exception raised in a script's ``ui()`` and goes on without
that script's UI, so the other tests pass with a panel that never built: here any such report fails. Each
version gets its own arguments (``lib_adapters/webui/gradio_compat.py``; none deprecated by the installed
version), the page's config serialises as Gradio sends it to the browser, and every event is wired (the field
changes update a unit's state, the tab's Train and Resume buttons run the tab's JavaScript first).
"""
from __future__ import annotations

import json
import warnings

import gradio as gr
import pytest

from lib_adapters.webui import host
from lib_adapters.webui.gradio_compat import GRADIO_4
from lib_adapters.webui.panel.infotext import LABELS
from lib_adapters.webui.training.tab import START_JS, TrainTab, eid
from modules import errors, scripts, shared
from test_forge_panel_e2e import fresh_panel

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


@pytest.fixture()
def module(tmp_path):
    loaded = fresh_panel(tmp_path)
    errors.exception_records.clear()
    yield loaded
    host.forget()


def _config(demo: gr.Blocks) -> dict:
    return json.loads(json.dumps(demo.get_config_file(), default=str))


def _dependencies(config: dict) -> list[dict]:
    return config["dependencies"]


def _argument_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings our code or a component's arguments raised while building (a deprecated plot width, ...)."""
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if "lib_adapters" in w.filename or "argument" in str(w.message).lower()]


def test_the_installed_gradio_is_one_the_hosts_run():
    assert gr.__version__ in ("3.41.2", "4.40.0")
    assert GRADIO_4 is (GRADIO_MAJOR == 4)


@pytest.mark.parametrize("is_img2img", [False, True])
def test_the_panel_builds_every_unit_without_an_error(module, is_img2img):
    shared.opts.data["adapters_unit_count"] = 2
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(is_img2img, [module.AdaptersScript])
    with warnings.catch_warnings(record=True) as caught, gr.Blocks(analytics_enabled=False) as demo:
        warnings.simplefilter("always")
        runner.prepare_ui()
        inputs = runner.setup_ui()
    assert errors.exception_records == [], errors.exception_records
    assert _argument_warnings(caught) == []
    script = runner.alwayson_scripts[0]
    assert script.args_to - script.args_from == 2 and all(isinstance(c, gr.State) for c in inputs[script.args_from:])
    images = {c.elem_id: c for c in demo.blocks.values() if isinstance(c, gr.Image) and c.elem_id}
    tab = "img2img" if is_img2img else "txt2img"
    for unit in (1, 2):
        for name in ("image", "mask"):
            image = images[f"script_{tab}_adapters_unit{unit}_{name}"]
            assert (image.sources == ["upload"]) if GRADIO_4 else (image.source == "upload")
    config = _config(demo)
    state_ids = {c._id for c in inputs[script.args_from:]}
    updates_state = [d for d in _dependencies(config) if set(d["outputs"]) & state_ids]
    assert len(updates_state) >= 2 * 20  # each unit's fields (and its extra images) update its state
    assert len(script.infotext_fields) == 2 * (1 + len(LABELS))  # "Enabled" and every field, per unit


def test_the_train_tab_builds_and_its_start_buttons_run_the_javascript(module):
    tab = TrainTab(lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo = tab.build()
    assert _argument_warnings(caught) == []
    assert errors.exception_records == []
    config = _config(demo)
    by_id = {c.elem_id: c._id for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    js_of = {}
    for dependency in _dependencies(config):
        for target in dependency.get("targets", []):
            block = target[0] if isinstance(target, (list, tuple)) else target
            js_of.setdefault(block, dependency.get("js"))
    assert js_of[by_id[eid("start")]] == START_JS and js_of[by_id[eid("resume")]] == START_JS
    assert js_of[by_id[eid("interrupt")]] in (None, "")

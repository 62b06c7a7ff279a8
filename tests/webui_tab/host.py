"""A minimal host page for the "Train Adapter" tab: the stub WebUI (tests/stubs/modules) with the tiny
model loaded, ``scripts/adapters_train.py`` loaded the way the WebUI loads an extension script, and its
``on_ui_tabs`` result rendered in a tab of a gradio app served on 127.0.0.1 with the queue enabled
(``queue(64)`` as the WebUI does); ``on_app_started`` then registers the training API on that app (the
WebUI runs with ``--api`` here).

The WebUI injects extension JavaScript into its page template; a browser test adds
``javascript/adapters_train.js`` with ``page.add_script_tag`` instead (see ``JAVASCRIPT``).

Run it by hand to look at the tab: ``.venv/bin/python tests/webui_tab/host.py [folder]``.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
JAVASCRIPT = ROOT / "javascript" / "adapters_train.js"
ENTRY_POINT = ROOT / "scripts" / "adapters_train.py"


@dataclass
class Host:
    url: str
    demo: Any
    app: Any
    module: Any  # the loaded scripts/adapters_train.py (``module.jobs()`` is the tab's job manager)

    def close(self) -> None:
        jobs = self.module._jobs
        if jobs is not None:
            jobs.interrupt()
            jobs.wait(timeout=60)
        server = getattr(self.demo, "server", None)
        if server is not None:  # do not wait for the browser's open queue connections (uvicorn's graceful wait)
            server.force_exit = True
        self.demo.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_entry_point():
    """Execute scripts/adapters_train.py as the WebUI's script loader does (its own module, repo on sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("adapters_train_entry", ENTRY_POINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(root: str | os.PathLike) -> Host:
    """Stub WebUI rooted at ``root`` (models/Lora, outputs/ under it), the tiny SD1 model, the tab served."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    import driver
    from modules import script_callbacks

    driver.reset_webui(root)
    driver.load_tiny_model("sd1")
    module = load_entry_point()
    interfaces = script_callbacks.ui_tabs_callback()  # before the page's Blocks, as ui.create_ui does
    assert interfaces, "scripts/adapters_train.py added no tab (see the errors printed above)"
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion (test host)") as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.Tab(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    demo.queue(64)
    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                              quiet=True, show_error=True)
    from modules import shared
    shared.cmd_opts.api = True  # as a WebUI started with --api: on_app_started registers the training routes
    script_callbacks.app_started_callback(demo, app)
    return Host(url=url, demo=demo, app=app, module=module)


if __name__ == "__main__":
    for path in (ROOT, ROOT / "tests" / "stubs", ROOT / "tests"):
        sys.path.insert(0, str(path))
    import tempfile
    import time

    from training.train_helpers import make_shapes_dataset

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="adapters-tab-"))
    dataset = make_shapes_dataset(folder / "dataset")
    host = serve(folder / "webui")
    print(f"serving {host.url}; dataset folder: {dataset}; add {JAVASCRIPT} to the page for task ids")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        host.close()

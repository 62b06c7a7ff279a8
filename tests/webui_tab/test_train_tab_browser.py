"""The "Train Adapter" tab driven in headless Chromium against the stub WebUI host page (host.py):
it renders, switching the method swaps the knob groups (and IP's projection faceid its FaceID knobs), a bad
dataset is reported in the tab, a run starts from the filled-in form, progress advances (step text, loss plot,
log, a sample image in the gallery), Interrupt stops it with a checkpoint and the LoRA published, and the files
are on disk.

Needs the ``playwright`` package and a system Chromium at /usr/bin/chromium (never a downloaded
browser; tests/setup_env.sh installs Debian's as root). Without them it is skipped with the reason, except
under ``CI=true``, where a missing browser fails the run instead of passing it untested. ``ADAPTERS_TAB_SCREENSHOT=docs/train_tab.png`` also
saves a screenshot of the tab after the run.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from training.train_helpers import make_shapes_dataset

CHROMIUM = os.environ.get("ADAPTERS_CHROMIUM", "/usr/bin/chromium")  # override: tests of this rule


def _unavailable(reason: str) -> None:
    """Skip here; fail under CI, where a skipped browser test would hide a missing install step."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import playwright.sync_api as playwright_api
except ImportError:
    _unavailable("the playwright package is not installed (pip install -r requirements-test.txt)")
if not os.access(CHROMIUM, os.X_OK):
    _unavailable(f"no system Chromium at {CHROMIUM} (apt-get install chromium; tests/setup_env.sh does it as root)")

from webui_tab.host import JAVASCRIPT, serve  # noqa: E402

TIMEOUT_MS = 45_000


def _field(page, elem_id: str, kind: str = "input"):
    return page.locator(f"#adapters_train_{elem_id} {kind}").first


def _fill(page, elem_id: str, value: str, kind: str = "input") -> None:
    box = _field(page, elem_id, kind)
    box.fill(value)
    box.press("Tab")  # gradio 3 commits numbers and slider boxes on blur


def _select(page, elem_id: str, choice: str) -> None:
    """Pick a gradio 3 dropdown's option as a user does: open the list, click the option."""
    _field(page, elem_id).click()
    page.locator(f"#adapters_train_{elem_id} ul.options li", has_text=choice).first.click()


PROGRESS_JS = "document.querySelector('#adapters_train_progress .prose').innerText"


def _progress(page) -> str:
    return page.locator("#adapters_train_progress").last.inner_text()  # gradio 3 puts the id on the block and the HTML


@pytest.fixture
def host(tmp_path):
    served = serve(tmp_path / "webui")
    yield served
    served.close()


@pytest.fixture
def page():
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@pytest.mark.slow  # about 30 s on 2 cores: a real server, a browser and a few training steps
def test_train_then_interrupt_in_the_browser(host, page, tmp_path):
    from modules import progress
    from lib_adapters.webui.training.jobs import JobState

    dataset = make_shapes_dataset(tmp_path / "dataset")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(host.url)
    page.wait_for_selector("#adapters_train_start")
    page.add_script_tag(path=str(JAVASCRIPT))  # a classic <script>, as the WebUI adds extension scripts
    assert page.locator("#tab_adapters_train").count() == 1
    assert _field(page, "method").input_value() == "LoRA"
    assert _progress(page).strip() == "No training run yet."

    # the method's own knobs: T2I-Adapter's group appears, LoRA's goes, its learning rate is set
    assert page.locator("#adapters_train_rank").is_visible()
    assert page.locator("#adapters_train_t2i_condition").is_hidden()
    assert page.locator("#adapters_train_sample_image").is_hidden()
    _select(page, "method", "T2I-Adapter")
    page.wait_for_selector("#adapters_train_t2i_condition", state="visible")
    page.wait_for_selector("#adapters_train_rank", state="hidden")
    assert page.locator("#adapters_train_ip_projection").is_hidden()
    assert float(_field(page, "learning_rate").input_value()) == 1e-5
    assert "x.<condition>.png" in _field(page, "dataset_dir", "textarea").get_attribute("placeholder")
    # the samples' condition image box shows for the adapters only, labelled for the method
    page.wait_for_selector("#adapters_train_sample_image", state="visible")
    assert "Sample condition image" in page.locator("#adapters_train_sample_image").inner_text()
    _select(page, "method", "IP-Adapter")
    page.wait_for_function("() => document.querySelector('#adapters_train_sample_image').innerText"
                           ".includes('Sample reference image')")
    # FaceID: its face models and LoRA rank show in place of the CLIP encoder, which it does not read
    assert page.locator("#adapters_train_ip_face_pack").is_hidden()
    _select(page, "ip_projection", "faceid")
    page.wait_for_selector("#adapters_train_ip_face_pack", state="visible")
    page.wait_for_selector("#adapters_train_ip_image_encoder", state="hidden")
    assert page.locator("#adapters_train_ip_lora_rank").is_visible()
    assert _field(page, "ip_face_pack").input_value() == "buffalo_l"
    _select(page, "ip_projection", "plain")
    page.wait_for_selector("#adapters_train_ip_face_pack", state="hidden")
    page.wait_for_selector("#adapters_train_ip_image_encoder", state="visible")
    _select(page, "method", "LoRA")
    page.wait_for_selector("#adapters_train_rank", state="visible")
    page.wait_for_selector("#adapters_train_t2i_condition", state="hidden")
    page.wait_for_selector("#adapters_train_sample_image", state="hidden")

    # a bad dataset folder is reported in the tab, nothing starts
    _fill(page, "dataset_dir", str(tmp_path / "missing"), "textarea")
    _fill(page, "output_name", "tab_lora", "textarea")
    page.click("#adapters_train_start")
    page.wait_for_selector("#adapters_train_result .error")
    assert str(tmp_path / "missing") in page.locator("#adapters_train_result").last.inner_text()
    assert host.module.jobs().status().state is JobState.IDLE

    _fill(page, "dataset_dir", str(dataset), "textarea")
    _fill(page, "steps", "400")
    _fill(page, "resolution", "64", "input[type=number]")
    _fill(page, "sample_every", "2")
    _fill(page, "sample_prompts", "a red circle", "textarea")
    page.click("#adapters_train_advanced .label-wrap")  # open the accordion
    _fill(page, "sample_steps", "2")
    page.click("#adapters_train_start")

    # progress advances: step text, a loss curve drawn, the log filled, Interrupt enabled
    page.wait_for_function(
        "() => /step ([2-9]|\\d\\d+) \\/ 400/.test(" + PROGRESS_JS + ")")
    assert "ETA" in _progress(page) and "loss" in _progress(page)
    page.wait_for_selector("#adapters_train_loss_plot .vega-embed canvas")  # vega drew the curve
    page.wait_for_function("() => document.querySelector('#adapters_train_log textarea').value.includes('starting')")
    page.wait_for_selector("#adapters_train_gallery img")  # the sample made at step 2
    assert page.locator("#adapters_train_start").is_disabled()
    running = host.module.jobs().status()
    assert running.state is JobState.RUNNING and running.step >= 2

    # a reloaded page shows the run that goes on (the tab's load event follows it)
    page.reload()
    page.wait_for_selector("#adapters_train_start")
    page.add_script_tag(path=str(JAVASCRIPT))
    page.wait_for_function("() => " + PROGRESS_JS + ".includes('Running')")
    assert page.locator("#adapters_train_start").is_disabled()

    page.click("#adapters_train_interrupt")
    page.wait_for_function("() => " + PROGRESS_JS + ".includes('Interrupted')")
    page.wait_for_selector("#adapters_train_result code")
    result = page.locator("#adapters_train_result").last.inner_text()

    status = host.module.jobs().status()
    assert status.state is JobState.INTERRUPTED and 2 <= status.step < 400
    assert status.samples and all(Path(p).is_file() for p in status.samples)
    assert page.locator("#adapters_train_gallery img").count() >= 1
    assert f"Interrupted at step {status.step} / 400" in result
    assert status.checkpoint and Path(status.checkpoint).is_file() and status.checkpoint in result
    assert status.output and Path(status.output).is_file() and Path(status.output).name == "tab_lora.safetensors"
    assert "<lora:tab_lora:1>" in result and "Resume" in result
    assert re.search(rf"step {status.step} / 400", _progress(page))
    assert not page.locator("#adapters_train_resume").is_disabled()
    # the button's JS made a task id and the run was registered under it for the WebUI's progress bar
    assert any(t and t.startswith("task(") for t in progress.finished_tasks)
    # on_app_started registered the training API over the same jobs
    api = page.request.get(host.url.rstrip("/") + "/adapters/v1/train").json()
    assert (api["state"], api["step"], api["checkpoint"]) == ("interrupted", status.step, status.checkpoint)
    assert errors == []

    shot = os.environ.get("ADAPTERS_TAB_SCREENSHOT")
    if shot:
        page.locator("#tab_adapters_train").screenshot(path=shot)

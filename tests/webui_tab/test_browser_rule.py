"""The browser test's availability rule: skipped without Chromium on a developer's machine, but failing the run
under ``CI=true``, so a CI machine that lacks the browser cannot pass the tab's UI untested."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BROWSER_TEST = Path(__file__).with_name("test_train_tab_browser.py")


def _run_without_chromium(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["ADAPTERS_CHROMIUM"] = str(tmp_path / "no-chromium")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(BROWSER_TEST)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_chromium_the_browser_test_is_skipped_off_ci(tmp_path, ci):
    result = _run_without_chromium(tmp_path, ci)
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: the module skipped, no test collected
    assert "1 skipped" in result.stdout and "no system Chromium" in result.stdout


def test_without_chromium_the_browser_test_fails_under_ci(tmp_path):
    result = _run_without_chromium(tmp_path, "true")
    assert result.returncode != 0
    assert "CI=true and the browser test cannot run" in result.stdout + result.stderr

#!/usr/bin/env bash
# The one command that installs the test environment and runs the tests (the README names it,
# and .ci/run calls it). The environment lives in .venv, or in $ADAPTERS_VENV when set.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ADAPTERS_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r requirements-test.txt
# The genuine ldm UNet the WebUI runs for SD1/SD2; its own dependency list is far wider than ldm needs.
"${pip[@]}" --no-deps stable-diffusion-sdkit==2.1.5
exec "$venv/bin/python" -m pytest -q "$@"

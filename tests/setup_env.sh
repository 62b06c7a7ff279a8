#!/usr/bin/env bash
# Creates .venv (or $ADAPTERS_VENV) with the pinned test environment; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ADAPTERS_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r requirements-test.txt
# The genuine ldm UNet the WebUI runs for SD1/SD2; its own dependency list is far wider than ldm needs.
"${pip[@]}" --no-deps stable-diffusion-sdkit==2.1.5

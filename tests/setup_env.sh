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
# The Train Adapter tab's browser test drives Debian's chromium (never a browser playwright downloads).
# Install it where it is missing and we may: as root with apt-get (a fresh CI machine). The package lists
# may be stale or absent there, so a failed install is retried once after `apt-get update`.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt_install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
  "${apt_install[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && "${apt_install[@]}" >/dev/null 2>&1; } \
    || echo "setup_env: could not install chromium with apt-get; the browser test will be skipped (fails under CI=true)" >&2
fi

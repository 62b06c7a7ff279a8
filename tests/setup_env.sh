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
# Forge main runs Gradio 4.40 where A1111 and Forge Classic run 3.41: the UI tests run under both
# (tests/run_gradio4.sh). The Gradio 4 venv holds only Forge's pins of gradio and what gradio 4 needs
# beyond the main venv (fastapi, pydantic 2, starlette, ...: about 130 MB, 25 s cold); everything else
# (torch, numpy, the stub WebUI's needs) comes from the main venv through a .pth file read after its own
# site-packages. pip never touches the main venv from there ("outside environment"). ADAPTERS_GRADIO4=0 skips it.
if [ "${ADAPTERS_GRADIO4:-1}" != 0 ]; then
  g4="${ADAPTERS_GRADIO4_VENV:-.venv-gradio4}"
  [ -x "$g4/bin/python" ] || "$python" -m venv "$g4"
  base_site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  g4_site="$("$g4/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  echo "$base_site" > "$g4_site/_adapters_base_venv.pth"
  "$g4/bin/python" -m pip install -q --disable-pip-version-check gradio==4.40.0 fastapi==0.104.1 pydantic==2.8.2 \
    anyio==3.7.1 2>&1 | grep -v -e "outside environment" -e "is ignored: it is neither" >&2 || true
  "$g4/bin/python" -c 'import gradio; assert gradio.__version__ == "4.40.0", gradio.__version__'
fi

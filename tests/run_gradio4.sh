#!/usr/bin/env bash
# The UI tests under Forge's Gradio 4.40 (tests/setup_env.sh makes the venv): the panel and the Train
# Adapter tab build and wire their events. tests/run.sh runs this after the main suite; by hand, after
# tests/setup_env.sh: bash tests/run_gradio4.sh [pytest args]  (ADAPTERS_GRADIO4_VENV: another venv path)
set -euo pipefail
cd "$(dirname "$0")/.."
g4="${ADAPTERS_GRADIO4_VENV:-.venv-gradio4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$g4/bin/python" -m pytest -q tests/test_ui_build.py tests/webui_tab/test_train_tab.py tests/test_stub_driver.py "$@"

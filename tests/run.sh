#!/usr/bin/env bash
# The one command that installs the test environment and runs the tests (the README names it,
# and .ci/run calls it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup_env.sh
# The test models are tiny: one torch thread each is several times faster on a 2-core machine than
# threads fighting over the cores (measured: the suite drops from minutes to under one).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
"${ADAPTERS_VENV:-.venv}/bin/python" -m pytest -q "$@" || status=$?
if [ "${ADAPTERS_GRADIO4:-1}" != 0 ]; then
  echo "--- the UI tests again under Gradio 4.40 (Forge's; ADAPTERS_GRADIO4=0 skips them)"
  bash tests/run_gradio4.sh || status=$?
fi
exit "$status"

#!/usr/bin/env bash
# The one command that installs the test environment and runs the tests (the README names it,
# and .ci/run calls it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup_env.sh
# The test models are tiny: one torch thread each is several times faster on a 2-core machine than
# threads fighting over the cores (measured: the suite drops from minutes to under one).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${ADAPTERS_VENV:-.venv}/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# The one command that installs the test environment and runs the tests (the README names it,
# and .ci/run calls it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup_env.sh
exec "${ADAPTERS_VENV:-.venv}/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# Installs into ./.venv if needed, then runs the tests (CPU, gloo, 2 cores):
#   bash scripts/run_tests.sh          # the full suite, what CI runs (346 passed in 18.4 min, clean clone 2026-12-03)
#   bash scripts/run_tests.sh --fast   # the fast tier, -m "not slow" (264 passed in 106 s, 2026-12-03)
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
if [[ "${1:-}" == "--fast" ]]; then
    shift
    set -- -m "not slow" "$@"
fi
python -m pytest tests -q "$@"

#!/usr/bin/env bash
# Installs into ./.venv if needed, then runs the tests (CPU, gloo, 2 cores):
#   bash scripts/run_tests.sh          # the full suite, what CI runs (298 passed in ~30 min, CI 2026-12-02)
#   bash scripts/run_tests.sh --fast   # the fast tier, -m "not slow" (255 passed in ~2.5 min at load 3, 2026-12-03)
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

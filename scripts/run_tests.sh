#!/usr/bin/env bash
# Installs into ./.venv if needed, then runs the whole test suite (CPU, gloo; ~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
python -m pytest tests -q "$@"

#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs torchtitan-mot with its test extras into it.
# torch is installed first and pinned so that pip never swaps the build later; set
# TORCH_SPEC to pick another one (e.g. a CUDA build matching your driver).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e ".[test]"

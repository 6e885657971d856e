#!/usr/bin/env bash
# Installs into ./.venv if needed, then trains the debug MoT on the bundled demo data
# (on the GPU if there is one, else on the CPU). Extra arguments override config fields.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
python -m torchtitan_mot.train --job.config_file train_configs/debug_mot.toml "$@"

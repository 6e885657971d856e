#!/usr/bin/env bash
# Single-node MoT training with torchrun, like TorchTitan's run_train.sh.
#   NGPU=8 CONFIG_FILE=train_configs/mot_8B_2modality.toml ./scripts/run_train.sh [--overrides]
# Env: NGPU (processes, default 8), CONFIG_FILE, LOG_RANK (ranks whose output is shown,
# default 0), extra torchrun flags in TORCHRUN_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-8}
CONFIG_FILE=${CONFIG_FILE:-./train_configs/debug_mot.toml}
LOG_RANK=${LOG_RANK:-0}

PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True} \
torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 ${TORCHRUN_ARGS:-} \
    -m torchtitan_mot.train --job.config_file "${CONFIG_FILE}" "$@"

"""Check an MoT sharding plan and estimate per-GPU memory, without GPUs.

    python scripts/check_plan.py --config train_configs/mot_8B_3modality.toml
    python scripts/check_plan.py --flavor 70B_3modality --ngpu 256 --tp 8 --pp 4

See `torchtitan_mot.infra.plan` (and docs/memory.md) for the model and its assumptions.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_mot.infra.plan import main  # noqa: E402

if __name__ == "__main__":
    main()

"""Training entry point: `python -m torchtitan_mot.train --job.config_file X.toml [overrides]`.

Works as a single process (it fills in the torchrun environment itself) and under
`torchrun --nproc_per_node=N`. It runs TorchTitan's own `main` with `MoTTrainer`
(`torchtitan_mot/trainer/trainer.py`) and `MoTConfigManager` (`torchtitan_mot/config.py`).
"""

import os
import socket

from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.compat.torchtitan_0_2_2 import isolate_compile_cache_per_rank, run_main
from torchtitan_mot.config import MoTConfigManager
from torchtitan_mot.trainer.logs import concise_logs
from torchtitan_mot.trainer.trainer import MoTTrainer


def _default_single_process_env() -> None:
    """Fill in the torchrun environment for a plain `python -m` run (rank 0 of 1)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def main() -> None:
    _default_single_process_env()
    isolate_compile_cache_per_rank()
    enable_cpu_fallback()
    with concise_logs():
        run_main(MoTTrainer, MoTConfigManager)


if __name__ == "__main__":
    main()

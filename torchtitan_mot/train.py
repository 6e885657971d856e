"""Training entry point: `python -m torchtitan_mot.train --job.config_file X.toml [overrides]`.

Works as a single process (it fills in the torchrun environment itself) and under
`torchrun --nproc_per_node=N`. It loads the job config with `load_job_config`
(`torchtitan_mot/config.py`), refuses a model that cannot fit this machine
(`torchtitan_mot/capacity.py`), then runs TorchTitan's own `main` with `MoTTrainer`
(`torchtitan_mot/trainer/trainer.py`). A `ConfigError`, at start-up or while the trainer is
built, prints as one line `error: <message>` and exits with status 2.
"""

import os
import socket
import sys

from torchtitan.tools.logging import init_logger

from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.compat.torchtitan_0_2_2 import isolate_compile_cache_per_rank, run_main
from torchtitan_mot.capacity import check_model_fits
from torchtitan_mot.config import ConfigError, load_job_config
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
    init_logger()  # TorchTitan's main calls it again (idempotent); config loading logs first
    with concise_logs():
        try:
            job_config = load_job_config(sys.argv[1:])
            check_model_fits(job_config)
            run_main(MoTTrainer, job_config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)


if __name__ == "__main__":
    main()

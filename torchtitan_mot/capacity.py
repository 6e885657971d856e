"""Refuse at start-up, before anything is allocated, a model whose state cannot fit here.

An 8B flavor on a laptop would otherwise start allocating ~15B parameters and die (or swap)
minutes later. The estimate is check_plan's memory model (`plan.plan_stage`: the
config's real sharding simulated on the meta device, 16 B of parameters, gradients and AdamW
state per parameter of the largest rank), compared with this machine: the device memory of
one GPU, or on a CPU the host RAM shared by the ranks of this host.
"""

import os

import torch
from torchtitan.config import JobConfig

from torchtitan_mot import build_model_args
from torchtitan_mot.config import ConfigError
from torchtitan_mot.plan import GIB, plan_stage

STATE_BYTES_PER_PARAM = 16
"""check_plan's model state per local parameter: fp32 weight + fp32 gradient + AdamW's two moments."""
CHECK_PLAN = "check_plan (python -m torchtitan_mot.check_plan --config ...)"


def available_bytes() -> tuple[int, str]:
    """(bytes one rank may use, where they are): one GPU's memory, or on a CPU the host RAM
    divided among this host's ranks."""
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.get_device_properties(device).total_memory, f"GPU {device} memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    where = "host RAM" if ranks == 1 else f"host RAM / {ranks} ranks on this host"
    return host // ranks, where


def check_model_fits(job_config: JobConfig) -> None:
    """ConfigError with the estimate, the available memory and check_plan named when the
    largest rank's parameters + gradients + optimizer state exceed this machine's memory."""
    try:
        args = build_model_args(job_config)
    except ValueError as e:  # the flavor against [mot]: the trainer's own checks, one line here
        raise ConfigError(str(e)) from None
    available, where = available_bytes()
    if args.param_counts()[0] * STATE_BYTES_PER_PARAM <= available:
        return  # even unsharded it fits: no need to simulate the sharding
    world = int(os.environ.get("WORLD_SIZE", 1))
    stages = [plan_stage(job_config, world, args, s)
              for s in range(job_config.parallelism.pipeline_parallel_degree)]
    worst = max(stages, key=lambda s: s.state_gib)
    if worst.state_gib * GIB <= available:
        return
    raise ConfigError(
        f"model.flavor {job_config.model.flavor} does not fit: its largest rank holds "
        f"{worst.params / 1e9:.2f}B parameters = {worst.state_gib:,.1f} GiB of parameters, "
        f"gradients and AdamW state ({worst.total_gib:,.1f} GiB with activations and FSDP "
        f"buffers), but {where} is {available / GIB:,.1f} GiB; pick a smaller --model.flavor or "
        f"more devices, and size the layout with {CHECK_PLAN}"
    )

"""Pre-flight checks for a multi-node launch, run once before any rank starts.

`scripts/multinode_trainer.slurm` runs

    python -m torchtitan_mot.launch_check --nodes N --procs-per-node G -- --job.config_file X [overrides]

with the trainer's own arguments, so a missing or unreadable config, or an allocation that the
parallel degrees do not fit, stops the job with one line in its output instead of N x G ranks
each failing after rendezvous (or waiting in it for the join timeout).
"""

import argparse
import logging
import math
import os
import sys
import tomllib
from collections.abc import Sequence

import torch
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

_CONFIG_FLAGS = ("--job.config_file", "--job.config-file")


class LaunchError(ValueError):
    """A launch that cannot work; the message names the file or setting to fix."""


def config_file_of(trainer_args: Sequence[str]) -> str:
    """The `--job.config_file` value, found the way TorchTitan's ConfigManager finds it."""
    for i, arg in enumerate(trainer_args):
        name, eq, value = arg.partition("=")
        if name in _CONFIG_FLAGS:
            if eq:
                return value
            if i + 1 < len(trainer_args):
                return trainer_args[i + 1]
    raise LaunchError("no --job.config_file among the trainer arguments (set CONFIG_FILE)")


def check_config_file(path: str) -> None:
    """The file exists, can be read and is TOML (ConfigManager would log a traceback per rank)."""
    if not os.path.exists(path):
        raise LaunchError(f"config file {path} (CONFIG_FILE): no such file")
    try:
        with open(path, "rb") as f:
            tomllib.load(f)
    except OSError as e:
        raise LaunchError(f"config file {path} (CONFIG_FILE): cannot be read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise LaunchError(f"config file {path} (CONFIG_FILE): not valid TOML: {e}") from e


def parse_job_config(trainer_args: Sequence[str]) -> JobConfig:
    """The JobConfig the trainer will build from the same arguments (TOML + overrides)."""
    from torchtitan_mot.config import MoTConfigManager

    return MoTConfigManager().parse_args(list(trainer_args))


def check_parallel_degrees(config: JobConfig, nodes: int, procs_per_node: int) -> ParallelDims:
    """The allocation's rank count fits the configured degrees; returns TorchTitan's ParallelDims."""
    world_size = nodes * procs_per_node
    p = config.parallelism
    degrees = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    inferred_shard = p.data_parallel_shard_degree == -1
    if not inferred_shard:
        degrees["data_parallel_shard_degree"] = p.data_parallel_shard_degree
    product = math.prod(degrees.values())
    ranks = f"{nodes} nodes x {procs_per_node} processes per node (GPUS_PER_NODE) = {world_size} ranks"
    named = " * ".join(f"parallelism.{k}({v})" for k, v in degrees.items())
    if inferred_shard and world_size % product:
        raise LaunchError(f"{ranks}, not a multiple of {named} = {product}")
    if not inferred_shard and world_size != product:
        raise LaunchError(f"{ranks}, but {named} = {product}")
    try:
        return ParallelDims(
            dp_shard=p.data_parallel_shard_degree, dp_replicate=p.data_parallel_replicate_degree,
            cp=p.context_parallel_degree, tp=p.tensor_parallel_degree,
            pp=p.pipeline_parallel_degree, ep=p.expert_parallel_degree,
            etp=p.expert_tensor_parallel_degree, world_size=world_size,
        )
    except AssertionError as e:
        raise LaunchError(f"{ranks}: parallelism rejected by TorchTitan: {e}") from e


def describe_devices(procs_per_node: int) -> str:
    """What the ranks of this node will run on; more processes than GPUs is an error."""
    if not torch.cuda.is_available():
        return f"no GPU on this node: {procs_per_node} CPU ranks per node with gloo"
    gpus = torch.cuda.device_count()
    if procs_per_node > gpus:
        raise LaunchError(f"GPUS_PER_NODE={procs_per_node}, but this node has {gpus} GPUs")
    return f"{procs_per_node} of this node's {gpus} GPUs per node with NCCL"


def check_launch(nodes: int, procs_per_node: int, trainer_args: Sequence[str]) -> str:
    """Run every check; return a one-line summary of the launch."""
    if nodes < 1 or procs_per_node < 1:
        raise LaunchError(f"{nodes} nodes x {procs_per_node} processes per node: both must be >= 1")
    config_file = config_file_of(trainer_args)
    check_config_file(config_file)
    dims = check_parallel_degrees(parse_job_config(trainer_args), nodes, procs_per_node)
    return (f"{config_file}: {nodes * procs_per_node} ranks = dp_replicate {dims.dp_replicate} x "
            f"dp_shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp} x pp {dims.pp}; "
            f"{describe_devices(procs_per_node)}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --nodes N --procs-per-node G -- TRAINER_ARGS")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--procs-per-node", type=int, required=True)
    args = parser.parse_args(argv[:split])
    trainer_args = argv[split + 1:]
    # The trainer prints ConfigManager's warnings itself; keep the job output to one line here.
    root = logging.getLogger()  # TorchTitan's logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        print(f"launch_check: {check_launch(args.nodes, args.procs_per_node, trainer_args)}", flush=True)
    except LaunchError as e:
        print(f"launch_check: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        root.setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

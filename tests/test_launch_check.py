"""`python -m torchtitan_mot.launch_check`, the SLURM launcher's pre-flight (in process).

The launcher's end-to-end failures (missing config, degrees that do not fit) are in
tests/e2e/test_slurm.py; these cover what that CPU-only job cannot reach.
"""

from pathlib import Path

import pytest
import torch

from torchtitan_mot.launch_check import LaunchError, check_launch, describe_devices, main

CONFIG = str(Path(__file__).resolve().parents[1] / "train_configs" / "debug_mot.toml")


def test_more_ranks_per_node_than_gpus_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert describe_devices(4) == "4 of this node's 4 GPUs per node with NCCL"
    with pytest.raises(LaunchError, match="GPUS_PER_NODE=8, but this node has 4 GPUs"):
        describe_devices(8)


def test_explicit_shard_degree_must_use_every_rank() -> None:
    args = ["--job.config_file", CONFIG, "--parallelism.data_parallel_shard_degree", "2"]
    assert "2 ranks = dp_replicate 1 x dp_shard 2 x cp 1 x tp 1 x pp 1" in check_launch(1, 2, args)
    with pytest.raises(LaunchError, match=r"= 4 ranks, but .*data_parallel_shard_degree\(2\) = 2"):
        check_launch(2, 2, args)


def test_invalid_toml_and_missing_flag_are_one_line_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\n")
    assert main(["--nodes", "2", "--procs-per-node", "1", "--", "--job.config_file", str(bad)]) == 1
    assert main(["--nodes", "2", "--procs-per-node", "1", "--"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"launch_check: error: config file {bad} (CONFIG_FILE): not valid TOML")
    assert lines[1] == "launch_check: error: no --job.config_file among the trainer arguments (set CONFIG_FILE)"

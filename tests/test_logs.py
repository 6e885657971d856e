"""Logs carry what a user acts on: repeated warnings once with a count, the model args on one
line, no colour codes in a file, no MFU on a CPU, no untrue warning from the CPU fallback."""

import dataclasses
import json
import logging
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

from torchtitan_mot.model import MoTModelArgs
from torchtitan_mot.trainer.logs import concise_logs
from helpers import run_ranks

from harness.trainer import run_trainer, small_args


def test_repeated_warnings_print_once_then_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), concise_logs():
        for _ in range(28):
            logger.warning("Dataset demo is being re-looped")
        logger.warning("something else")
        logger.info("step:  1")
        logger.info("step:  1")  # info lines are never folded
    assert [r.getMessage() for r in caplog.records] == [
        "Dataset demo is being re-looped",
        "something else",
        "step:  1",
        "step:  1",
        "Dataset demo is being re-looped (28 times in all; printed once)",
    ]


def test_torchtitans_model_args_dump_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    args = dataclasses.asdict(MoTModelArgs(vocab_size=97))
    with caplog.at_level(logging.INFO), concise_logs():
        # TorchTitan 0.2.2's Trainer.__init__, verbatim
        logger.info(f"Building mot debugmodelwith {json.dumps(args, indent=2, ensure_ascii=False)}")
    (line,) = [r.getMessage() for r in caplog.records]
    prefix = "Building mot debugmodel with "
    assert line.startswith(prefix) and "\n" not in line
    args.pop("_enforced")
    assert json.loads(line.removeprefix(prefix)) == args


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="MFU is measured on an accelerator")
def test_a_piped_cpu_run_logs_no_colour_no_mfu_no_probe(tmp_path: Path) -> None:
    result = run_trainer(small_args(tmp_path / "run", 2))
    log = result.stdout + result.stderr
    steps = [line for line in log.splitlines() if "  loss: " in line]
    assert len(steps) == 2, log[-3000:]
    assert all(line.endswith("mfu: n/a (CPU)") for line in steps), steps
    assert "\x1b[" not in log
    for noise in ("lspci", "Peak flops undefined", "fallback to A100", "In CPU autocast", '"_enforced"'):
        assert noise not in log, noise
    assert "MFU: not applicable on a CPU" in log


def _timeout_warnings(rank: int, world_size: int) -> list[str]:
    """The warnings TorchTitan's first-step `set_pg_timeouts` gives under the CPU fallback."""
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    from torchtitan_mot.compat.cpu import enable_cpu_fallback

    enable_cpu_fallback()
    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1,
                        world_size=world_size)
    dims.build_mesh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist_utils.set_pg_timeouts(timedelta(seconds=60), dims)
    dist.barrier()
    return [str(w.message) for w in caught]


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU fallback is a no-op there")
def test_cpu_fallback_sets_timeouts_without_warning(tmp_path: Path) -> None:
    """Unused mesh dimensions have groups on torch's "fake" backend: they get no timeout, and
    torch has nothing to warn about."""
    assert run_ranks(_timeout_warnings, 2, tmp_path) == [[], []]

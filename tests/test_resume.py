"""Exact resume through the real entry point: 10 straight steps == 5 + preemption + 5.

Losses are read from TensorBoard event files, which hold the logged float32 value exactly
(the console prints 5 decimals). The first leg is killed right after its step-5 checkpoint
(a real preemption, with `training.steps` 10 in both legs so the LR schedule is the same);
before the restart a partial `step-10` folder (no `.metadata`, as a run killed while writing
leaves it) is planted: the trainer must ignore it and resume from step 5. The procedure is
`harness.resume.check_exact_resume`.
"""

from pathlib import Path

import pytest
from harness.resume import check_exact_resume


@pytest.mark.slow
def test_exact_resume_single_process(tmp_path: Path) -> None:
    check_exact_resume(tmp_path, 1, [])


@pytest.mark.slow
def test_exact_resume_fsdp2(tmp_path: Path) -> None:
    check_exact_resume(tmp_path, 2, ["--parallelism.data_parallel_shard_degree", "2"])

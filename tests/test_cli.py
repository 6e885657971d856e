"""Every product tool runs as `python -m torchtitan_mot.<tool>` and answers `--help`."""

import subprocess
import sys

import pytest
from harness.trainer import REPO, trainer_env

TOOLS = ["train", "data.prepare", "warm_start", "generate", "check_plan", "benchmark", "benchmark.data",
         "compare_dense"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool: str) -> None:
    proc = subprocess.run([sys.executable, "-m", f"torchtitan_mot.{tool}", "--help"], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower(), proc.stdout[:2000]

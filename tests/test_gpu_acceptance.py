"""`scripts/gpu_acceptance.py --cpu-smoke` (the runner of the `gpu`-marked tests in tests/gpu/):
every CPU-capable stage runs and passes at tiny shapes, the CUDA-only stages say why they were
skipped, and the summary line counts right."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness.trainer import REPO, trainer_env

CUDA_ONLY = {"2a", "2b", "7a", "7b"}
# Each CUDA-only stage's skip names its kernel.
WHY = {"2a": "flex attention", "2b": "varlen", "7a": "grouped_mm", "7b": "flex attention"}
# float8 runs emulated on CPU where the optional torchao is installed.
TORCHAO = importlib.util.find_spec("torchao") is not None


@pytest.mark.slow
def test_cpu_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_acceptance.py", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    table = out[out.index("\nstage "):]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(\d[ab]?) .*?  (pass|FAIL\S*|skipped: [^\n]*?)  ", table, re.M)}
    assert set(rows) == {"1a", "1b", "2a", "2b", "3a", "3b", "4a", "4b", "5", "6", "7a", "7b"}, \
        table
    for stage, status in rows.items():
        if stage in CUDA_ONLY:
            assert status.startswith("skipped: needs CUDA"), (stage, status)
            assert WHY[stage] in status, (stage, status)
        elif stage == "4b" and not TORCHAO:
            assert status == "skipped: torchao is not installed", status
        else:
            assert status == "pass", (stage, status)
    ran = 8 if TORCHAO else 7
    assert out.strip().splitlines()[-1] == f"gpu acceptance: {ran}/{ran} passed", out[-2000:]
    # The trainer stages really trained and validated (their dumps hold the logs).
    for name in ("trainer_none", "trainer_selective"):
        assert "validate step:" in (tmp_path / name / "stdout.log").read_text()

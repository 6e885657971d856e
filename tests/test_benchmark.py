"""`scripts/benchmark.py` runs end to end and prints what the README's tables quote."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke() -> None:
    """Tiny shape, two measured steps: the table, the compile counters and the last line."""
    out = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--dim", "128", "--n-layers", "2",
         "--n-heads", "2", "--seq-len", "64", "--batch", "2", "--vocab", "64",
         "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("mot(2)", "dense"))}
    assert set(rows) == {"mot(2)", "dense"}, out
    # params and state MiB: MoT holds every non-embedding weight twice (+ its AdamW moments).
    assert float(rows["mot(2)"][1].rstrip("M")) > float(rows["dense"][1].rstrip("M"))
    assert float(rows["mot(2)"][8]) > float(rows["dense"][8])
    assert "host_malloc=resident" in out
    paired = re.search(r"paired per-step ratio: median (\S+) \(95% CI (\S+)-(\S+)\)", out)
    assert paired, out
    median, lo, hi = map(float, paired.groups())
    assert lo <= median <= hi
    assert re.search(r"^mot/dense step time ratio: \d+\.\d{3}$", out.strip().splitlines()[-1]), out

"""The paper-scale recipe (`train_configs/mot_37M.toml`) runs through `scripts/compare_dense.py`
with several seeds, at a tiny size on CPU."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--training.seq_len", "64", "--training.local_batch_size", "2",
        "--validation.seq_len", "64", "--validation.freq", "1",
        "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1",
        "--compile.no-enable", "--checkpoint.no-enable",
        "--training.mixed_precision_param", "float32"]


@pytest.mark.slow
def test_37m_recipe_two_seeds(tmp_path: Path) -> None:
    """Two seeds x (MoT 37M, its dense twin) x 2 steps: per-seed results, the summary with
    mean and spread, and a CSV with every seed's curves."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "scripts/compare_dense.py", "--config", "train_configs/mot_37M.toml",
         "--steps", "2", "--seeds", "2", "--seed", "3", "--out", str(tmp_path / "runs"),
         "--png", str(tmp_path / "curves.png"), "--csv", str(tmp_path / "curves.csv"),
         "--", *TINY],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    final = {}
    for seed in (3, 4):
        for name, flavor in (("mot", "37M_2modality"), ("dense", "37M_dense")):
            m = re.search(rf"^seed {seed} {name}: final validation loss total (\S+)", out, re.M)
            assert m, out
            final[seed, name] = float(m.group(1))
            log = (tmp_path / "runs" / f"seed{seed}" / name / "train.log").read_text()
            assert flavor in log, log[-2000:]
    assert final[3, "mot"] != final[4, "mot"], final  # the seed reached the initialisation
    summary = re.search(r"^steps-to-match total: (.+); per seed (\S+) (\S+)$", out, re.M)
    assert summary, out
    assert summary.group(1).startswith(("mean ", ">1.00")), summary.group(1)
    with open(tmp_path / "curves.csv") as f:
        header = next(csv.reader(f))
    assert {"seed3_mot_total", "seed4_dense_image"} <= set(header), header
    assert (tmp_path / "curves.png").stat().st_size > 0

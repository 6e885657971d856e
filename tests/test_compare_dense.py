"""The paper-scale recipe (`train_configs/mot_37M.toml`) runs through
`python -m torchtitan_mot.compare_dense` with several seeds, at a tiny size on CPU, and
leaves the checkout's tracked files alone."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness.trainer import REPO, trainer_env

TINY = ["--training.seq_len", "64", "--training.local_batch_size", "2",
        "--validation.seq_len", "64", "--validation.freq", "1",
        "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1",
        "--compile.no-enable", "--checkpoint.no-enable",
        "--training.mixed_precision_param", "float32"]


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_37m_recipe_two_seeds(tmp_path: Path) -> None:
    """Two seeds x (MoT 37M, its dense twin) x 2 steps: per-seed results, the summary with
    mean and spread, a CSV with every seed's curves, the same figures in the JSON, and
    everything written under --out (git status unchanged)."""
    before = git_status()
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.compare_dense", "--config", "train_configs/mot_37M.toml",
         "--steps", "2", "--seeds", "2", "--seed", "3", "--out", str(tmp_path / "runs"),
         "--", *TINY],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert git_status() == before
    out = proc.stdout
    report = json.loads((tmp_path / "runs" / "compare_dense.json").read_text())
    final = {}
    for seed in (3, 4):
        for name, flavor in (("mot", "37M_2modality"), ("dense", "37M_dense")):
            m = re.search(rf"^seed {seed} {name}: final validation loss total (\S+)", out, re.M)
            assert m, out
            final[seed, name] = float(m.group(1))
            logged = report["seeds"][str(seed)][name]["final_validation_loss"]["total"]
            assert f"{logged:.4f}" == m.group(1)
            log = (tmp_path / "runs" / f"seed{seed}" / name / "train.log").read_text()
            assert flavor in log, log[-2000:]
    assert final[3, "mot"] != final[4, "mot"], final  # the seed reached the initialisation
    summary = re.search(r"^steps-to-match total: (.+); per seed (\S+) (\S+)$", out, re.M)
    assert summary, out
    assert summary.group(1).startswith(("mean ", ">1.00")), summary.group(1)
    assert report["steps_to_match"]["total"]["summary"] == summary.group(1)
    with open(tmp_path / "runs" / "mot_vs_dense.csv") as f:
        header = next(csv.reader(f))
    assert {"seed3_mot_total", "seed4_dense_image"} <= set(header), header
    assert (tmp_path / "runs" / "mot_vs_dense.png").stat().st_size > 0

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
    with open(tmp_path / "runs" / "mot_vs_dense.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"seed3_mot_total", "seed4_dense_image"} <= set(rows[0]), rows[0]
    # Each seed's steps-to-match, recomputed from the CSV curves: the first (interpolated) step
    # at which MoT's total loss reaches the dense run's final one, over dense's last step.
    for seed, printed in zip((3, 4), summary.groups()[1:]):
        mot = [(int(r["step"]), float(r[f"seed{seed}_mot_total"])) for r in rows if r[f"seed{seed}_mot_total"]]
        dense = [(int(r["step"]), float(r[f"seed{seed}_dense_total"])) for r in rows if r[f"seed{seed}_dense_total"]]
        target, last = dense[-1][1], dense[-1][0]
        below = [i for i, (_, loss) in enumerate(mot) if loss <= target]
        if not below:
            assert printed == ">1.00", (seed, printed, mot, dense)
            continue
        (s1, l1), i = mot[below[0]], below[0]
        s0, l0 = mot[i - 1] if i else (s1, l1)
        step = s1 if l0 == l1 else s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
        assert abs(float(printed) - step / last) <= 5e-3 + 1e-4, (seed, printed, step / last)
    matched = [float(r) for r in summary.groups()[1:] if r != ">1.00"]
    if not matched:
        assert summary.group(1) == ">1.00 in all 2 seeds", summary.group(1)
    else:
        mean = re.fullmatch(r"mean (\S+) sd (\S+) \(range (\S+)-(\S+)\)(, >1\.00 in 1 of 2 seeds)?",
                            summary.group(1))
        assert mean, summary.group(1)
        assert abs(float(mean.group(1)) - sum(matched) / len(matched)) <= 1e-2, summary.group(1)
        assert (float(mean.group(3)), float(mean.group(4))) == (min(matched), max(matched))
        assert (mean.group(5) is not None) == (len(matched) == 1), summary.group(1)
    assert report["steps_to_match"]["total"]["summary"] == summary.group(1)
    assert (tmp_path / "runs" / "mot_vs_dense.png").stat().st_size > 0


@pytest.mark.slow
def test_moe_trains_four_models(tmp_path: Path) -> None:
    """`--moe` (2 steps, tiny shapes): dense, MoT, the MoE-4x baseline and the hybrid each reach
    the trainer with their flavor and MoE setting, and steps-to-match is printed for moe4x and
    the hybrid, equal to the JSON's figures; the figure is written under --out."""
    before = git_status()
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_mot.compare_dense", "--moe", "--steps", "2",
         "--out", str(tmp_path / "runs"), "--", *TINY],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert git_status() == before
    # name -> (flavor, modalities, MoE modalities) as the trainer built the model, and the
    # expert-load console label of its MoE (the MoE-4x FFN serves all tokens)
    expected = {"dense": ("debugmodel_dense", 1, [], None), "mot": ("debugmodel", 2, [], None),
                "moe4x": ("debugmodel_moe4x", 1, [0], "all"), "hybrid": ("debugmodel", 2, [0], "text")}
    for name, (flavor, n_modalities, moe_modalities, label) in expected.items():
        log = (tmp_path / "runs" / name / "train.log").read_text()
        built = re.search(r"Building mot (\S+) with (\{.*\})$", log, re.M)
        assert built, log[-2000:]
        args = json.loads(built.group(2))
        assert (built.group(1), args["n_modalities"], args["moe_modalities"]) == (flavor, n_modalities, moe_modalities), name
        assert set(re.findall(r" moe/(\w+): max_load", log)) == ({label} if label else set()), name
    report = json.loads((tmp_path / "runs" / "compare_dense.json").read_text())
    assert report["flavors"] == {name: e[0] for name, e in expected.items()}
    for name in ("moe4x", "hybrid"):
        line = re.search(rf"^steps-to-match {name}: total (\S+)  text (\S+)  image (\S+)$", proc.stdout, re.M)
        assert line, proc.stdout[-3000:]
        for key, printed in zip(("total", "text", "image"), line.groups()):
            r = report["moe_steps_to_match"][name][key]
            assert printed == (">1.00" if r is None or r > 1.0 else f"{r:.2f}"), (name, key, printed, r)
    assert (tmp_path / "runs" / "moe.png").stat().st_size > 0

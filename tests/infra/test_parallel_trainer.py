"""The real trainer (debug_mot.toml, demo data) under TP=2 (SP + loss parallel) and PP=2
logs the same 5 losses and grad norms as one process started from the same seed checkpoint.

Tolerance: the logged 5 significant digits (1e-4 absolute; losses ~5-8, norms ~1-6).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "--job.config_file", "train_configs/debug_mot.toml", "--training.steps", "5",
    "--training.seq_len", "128", "--training.local_batch_size", "4",
    "--metrics.no-enable-tensorboard", "--validation.no-enable", "--debug.seed", "7",
    "--checkpoint.enable", "--checkpoint.interval", "1000",
    "--checkpoint.no-last-save-model-only",
]
LOG = re.compile(r"step:\s+(\d+)\s+loss:\s+([\d.]+)\s+grad_norm:\s+([\d.]+)")

pytestmark = pytest.mark.slow


def _train(dump: Path, nproc: int, *extra: str, entry: list[str], log_rank: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                     f"--local-ranks-filter={log_rank}"]
    proc = subprocess.run(
        [*launcher, *entry, *COMMON, "--job.dump_folder", str(dump), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-6000:]
    return {int(s): (float(loss), float(norm)) for s, loss, norm in LOG.findall(out)}


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    seed = tmp_path_factory.mktemp("seed")
    _train(seed, 1, "--checkpoint.create_seed_checkpoint",
           "--parallelism.data_parallel_shard_degree", "1", entry=["-m", "torchtitan_mot.train"])
    return seed / "checkpoint" / "step-0"


def _from_seed(seed_dir: Path, tmp_path: Path, name: str) -> Path:
    dump = tmp_path / name
    shutil.copytree(seed_dir, dump / "checkpoint" / "step-0")
    return dump


@pytest.fixture(scope="module")
def reference(seed_dir, tmp_path_factory) -> dict:
    dump = _from_seed(seed_dir, tmp_path_factory.mktemp("ref"), "ref")
    logs = _train(dump, 1, entry=["-m", "torchtitan_mot.train"])
    assert sorted(logs) == [1, 2, 3, 4, 5] and logs[1][0] > logs[5][0]
    return logs


@pytest.mark.parametrize(
    "name,extra,log_rank",
    [
        ("tp2", ["--parallelism.tensor_parallel_degree", "2"], 0),
        # the last stage logs the loss; modality ids reach stage 1 as a kwarg
        ("pp2", ["--parallelism.pipeline_parallel_degree", "2"], 1),
    ],
)
def test_trainer_matches_single_process(seed_dir, reference, tmp_path, name, extra, log_rank):
    logs = _train(_from_seed(seed_dir, tmp_path, name), 2, *extra,
                  entry=["-m", "torchtitan_mot.train"], log_rank=log_rank)
    assert sorted(logs) == sorted(reference), logs
    for step, (loss, norm) in reference.items():
        assert logs[step][0] == pytest.approx(loss, abs=1e-4), (step, logs[step], loss)
        assert logs[step][1] == pytest.approx(norm, abs=1e-4), (step, logs[step], norm)

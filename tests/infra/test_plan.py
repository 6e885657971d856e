"""scripts/check_plan.py builds the real sharded model on meta under a fake process group."""

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _check_plan(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_plan.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_8b_on_8_gpus_fsdp() -> None:
    import copy

    from torchtitan_mot import mot_args
    from torchtitan_mot.model import MoTTransformer

    args = copy.deepcopy(mot_args["8B_2modality"])
    args.vocab_size = 128256 + 8192 + 2  # text + one codebook + begin/end markers
    with torch.device("meta"):
        total = sum(p.numel() for p in MoTTransformer(args).parameters())
    out = _check_plan("--flavor", "8B_2modality", "--ngpu", "8")
    row = re.search(r"^\s+0\s+0\s+32\s+([\d.]+)B .*wq.0 \(Shard\(dim=0\),\) local \((\d+), 4096\)",
                    out, re.M)
    assert row, out
    assert abs(float(row.group(1)) * 1e9 - total / 8) < 2e6  # FSDP: 1/8 of every parameter
    assert int(row.group(2)) == 4096 // 8
    assert "-> fits in 80 GiB" in out


def test_tp_and_pp_shard_every_stage() -> None:
    out = _check_plan("--flavor", "debugmodel", "--ngpu", "8", "--tp", "2", "--pp", "2",
                      "--seq-len", "256")
    stages = re.findall(r"^\s+(\d)\s+(\d)\s+(\d)\s+.*wq.0 \((.*)\) local \((\d+), 256\)", out, re.M)
    # stage 0 is simulated on rank 0, stage 1 on rank 4; 6 layers split 3/3 (embedding
    # and output each count as a layer); wq's 256 rows: /2 (TP) then /2 (FSDP)
    assert [s[:2] for s in stages] == [("0", "0"), ("1", "4")], out
    assert all(int(s[4]) == 64 and "Shard(dim=0)" in s[3] for s in stages), out

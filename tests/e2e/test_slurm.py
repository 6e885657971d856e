"""`scripts/multinode_trainer.slurm` itself, run as a 2-node x 1-CPU-rank job on this machine.

`slurm_stubs/` puts stand-ins for sbatch, srun, scontrol and hostname first on PATH (see
fake_slurm.py): the job's nodes are local process groups with a real allocation's SLURM
environment, so the script's own rendezvous, per-node logs, argument passing and pre-flight
checks run unchanged. Losses come from TensorBoard (exact float32) and are compared with a plain
`torchrun --nproc_per_node=2` run of the same arguments.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e.slurm_stubs.fake_slurm import kill_node
from harness.trainer import run_trainer, trainer_env

from torchtitan_mot.run_metrics import LOSS, read_scalars

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "multinode_trainer.slurm"
STUBS = Path(__file__).resolve().parent / "slurm_stubs"

CONFIG = REPO / "train_configs" / "debug_mot.toml"
STEPS, CKPT_EVERY = 6, 3
JOB_NAME = "torchtitan-mot"  # the script's #SBATCH --job-name


def trainer_args(dump: Path) -> list[str]:
    """FSDP over 2 ranks, checkpoint every CKPT_EVERY steps; paths absolute (cwd = submit dir)."""
    return [
        "--job.dump_folder", str(dump),
        "--model.hf_assets_path", str(REPO / "assets" / "tokenizer"),
        "--training.dataset_path", str(REPO / "assets" / "demo" / "text_image"),
        "--training.steps", str(STEPS),
        "--training.seq_len", "128",
        "--training.local_batch_size", "2",
        "--parallelism.data_parallel_shard_degree", "2",
        "--checkpoint.enable",
        "--checkpoint.interval", str(CKPT_EVERY),
        "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard",
        "--debug.seed", "0",
        "--debug.deterministic",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**overrides: str) -> dict[str, str]:
    """The submitting shell: stand-ins and this Python's bin (torchrun, python) first on PATH."""
    path = os.pathsep.join([str(STUBS), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "GPUS_PER_NODE": "1", "CONFIG_FILE": str(CONFIG), "RDZV_PORT": str(free_port()),
            **overrides}


class Job:
    """One `sbatch --nodes=2` submission from `submit_dir`, running until it ends."""

    def __init__(self, submit_dir: Path, args: list[str], env: dict[str, str], nodes: int = 2):
        self.submit_dir = submit_dir
        self.proc = subprocess.Popen([str(STUBS / "sbatch"), f"--nodes={nodes}", str(SCRIPT), *args],
                                     cwd=submit_dir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        first = self.proc.stdout.readline()
        assert first.startswith("Submitted batch job "), first + self.proc.stdout.read()
        self.id = first.split()[-1]

    def wait(self, timeout: float = 900) -> int:
        rest = self.proc.communicate(timeout=timeout)[0]
        assert not rest, rest  # sbatch itself printed nothing more: the job's output is in its file
        return self.proc.returncode

    @property
    def output(self) -> str:
        """The job's own output: `#SBATCH --output=%x_%j.out` in the submit directory."""
        return (self.submit_dir / f"{JOB_NAME}_{self.id}.out").read_text()

    def node_logs(self) -> dict[str, str]:
        log_dir = self.submit_dir / "logs" / f"{JOB_NAME}_{self.id}"
        return {p.name: p.read_text() for p in sorted(log_dir.glob("*"))}


def assert_losses_equal(got: dict[int, float], expected: dict[int, float], steps: range) -> float:
    """Equal up to the float32 scalar's last bit (test_resume.py explains the 1 ulp); max diff."""
    assert set(steps) <= set(got), (sorted(got), list(steps))
    diffs = {s: abs(got[s] - expected[s]) for s in steps}
    ulp = {s: torch.finfo(torch.float32).eps * abs(expected[s]) for s in steps}
    assert all(diffs[s] <= ulp[s] for s in steps), (got, expected)
    return max(diffs.values())


def assert_node_logs(job: Job, losses: dict[int, float], steps: range) -> None:
    """One log per node, each holding its own rank's step lines with the job's losses."""
    logs = job.node_logs()
    assert sorted(logs) == ["node_node1.log", "node_node2.log"], sorted(logs)
    for name, text in logs.items():
        for s in steps:
            assert f"step: {s:2}  loss: {losses[s]:8.5f}" in text, (name, s, text[-3000:])  # a file: no colour codes


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of a plain `torchrun --nproc_per_node=2` run of the same arguments."""
    dump = tmp_path_factory.mktemp("torchrun") / "dump"
    losses = run_trainer(["--job.config_file", str(CONFIG), *trainer_args(dump)], nproc=2,
                         log_rank=None, cwd=dump.parent, env=trainer_env(OMP_NUM_THREADS="1")).scalars(LOSS)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
def test_two_node_job_matches_torchrun(reference: dict[int, float], tmp_path: Path) -> None:
    started = time.monotonic()
    job = Job(tmp_path, trainer_args(tmp_path / "dump"), job_env())
    assert job.wait() == 0, job.output[-4000:] + str(job.node_logs())[-4000:]
    assert "launch_check: " in job.output and "2 ranks = dp_replicate 1 x dp_shard 2" in job.output
    assert "head node node1 (127.0.0.1:" in job.output
    losses = read_scalars(tmp_path / "dump")
    diff = assert_losses_equal(losses, reference, range(1, STEPS + 1))
    assert_node_logs(job, losses, range(1, STEPS + 1))
    print(f"2-node SLURM job vs torchrun: max abs loss diff steps 1-{STEPS} = {diff} "
          f"(job wall {time.monotonic() - started:.0f} s)")


@pytest.mark.slow
def test_node_failure_then_resubmit_resumes(reference: dict[int, float], tmp_path: Path) -> None:
    """Node 2 dies after the step-3 checkpoint; the resubmitted job resumes from it."""
    dump = tmp_path / "dump"
    ckpt = dump / "checkpoint"
    first = Job(tmp_path, trainer_args(dump), job_env())
    deadline = time.monotonic() + 900
    while not (ckpt / f"step-{CKPT_EVERY}" / ".metadata").exists():
        assert first.proc.poll() is None, first.output[-4000:]
        assert time.monotonic() < deadline, f"no step-{CKPT_EVERY} checkpoint within 900 s"
        time.sleep(0.05)
    assert kill_node(first.id, 1), "no process of node 2 found"
    assert first.wait() != 0
    assert "srun: error: node2: task 1: Killed by signal 9" in first.output, first.output[-4000:]
    assert not (ckpt / f"step-{STEPS}").exists(), "the first job was not stopped before the end"
    before = read_scalars(dump)
    diff_before = assert_losses_equal(before, reference, range(1, CKPT_EVERY + 1))

    second = Job(tmp_path, trainer_args(dump), job_env())
    assert second.wait() == 0, second.output[-4000:]
    for name, text in second.node_logs().items():
        assert f"Loading the checkpoint from {ckpt / f'step-{CKPT_EVERY}'}" in text, name
        assert f"Training starts at step {CKPT_EVERY + 1}" in text, name
    resumed = read_scalars(dump)
    diff_after = assert_losses_equal(resumed, reference, range(CKPT_EVERY + 1, STEPS + 1))
    assert_node_logs(second, resumed, range(CKPT_EVERY + 1, STEPS + 1))
    print(f"killed + resubmitted vs torchrun: max abs loss diff steps 1-{CKPT_EVERY} = "
          f"{diff_before}, steps {CKPT_EVERY + 1}-{STEPS} = {diff_after}")


def assert_stops_with_one_line(tmp_path: Path, env: dict[str, str], args: list[str],
                               *names: str) -> None:
    """The job fails before any rank starts; its whole output is one line naming `names`."""
    job = Job(tmp_path, args, env)
    assert job.wait() != 0
    lines = job.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_check: error: "), job.output
    assert all(name in lines[0] for name in names), lines[0]
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_missing_config_stops_the_job(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert_stops_with_one_line(tmp_path, job_env(CONFIG_FILE=missing), [], missing, "no such file")


@pytest.mark.slow
def test_ranks_that_do_not_fit_the_degrees_stop_the_job(tmp_path: Path) -> None:
    args = ["--parallelism.tensor_parallel_degree", "4"]
    assert_stops_with_one_line(tmp_path, job_env(), args, "= 2 ranks", "tensor_parallel_degree(4)")

"""Run `python -m torchtitan_mot.train` (under torchrun for several ranks) and read what it logged.

The one way a test trains end to end: the command, an environment that imports this
checkout and inherits no rank variables, its whole process tree killed on a timeout (torchrun's
workers, in sessions of their own, would otherwise outlive it), and the steps read back from the run's TensorBoard
events (`torchtitan_mot.run_metrics`: exact float32 values, not the rounded, coloured console).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchtitan_mot.run_metrics import event_files, read_scalars, read_steps

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_mot.toml"


CONSOLE_STEP = re.compile(r"INFO - step:\s*(\d+)\s+loss:\s*(-?[\d.]+|nan|inf)\s")  # not "validate step:"


def console_losses(log: str) -> dict[int, float]:
    """step -> loss as printed on the console (5 decimals, no colour in a file): for a run
    killed before its TensorBoard events were flushed."""
    return {int(m[1]): float(m[2]) for m in CONSOLE_STEP.finditer(log)}


def trainer_cmd(args: Sequence[str], nproc: int = 1, log_rank: int | None = 0) -> list[str]:
    """The entry point, under torchrun when `nproc` > 1 (showing `log_rank`'s output only,
    every rank's with None)."""
    entry = ["-m", "torchtitan_mot.train", *args]
    if nproc == 1:
        return [sys.executable, *entry]
    shown = [] if log_rank is None else [f"--local-ranks-filter={log_rank}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *shown, *entry]


def trainer_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH and no rank
    variables (a test run under torchrun would otherwise hand its own to the child)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in new sessions, so a
    process-group kill would leave them training)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (torchrun's workers too)."""
    for p in _process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def dump_folder(args: Sequence[str]) -> Path:
    """The `--job.dump_folder` the arguments set (the last one wins, as in the trainer)."""
    folders = [b for a, b in zip(args, args[1:]) if a == "--job.dump_folder"]
    if not folders:
        raise ValueError("the harness reads the run's TensorBoard events: pass --job.dump_folder")
    return Path(folders[-1])


@dataclass
class Run:
    """A finished trainer run: its exit status, output, and what it logged (its own event
    files: an earlier run into the same dump folder is not this run)."""

    dump: Path
    returncode: int
    stdout: str
    stderr: str
    events: list[Path]

    @property
    def log(self) -> str:
        return self.stdout + self.stderr

    def scalars(self, tag: str) -> dict[int, float]:
        """step -> value of a logged metric (e.g. `loss/text`, `validation/loss`)."""
        return read_scalars(self.events, tag)

    def steps(self) -> dict[int, tuple[float, float]]:
        """step -> (loss, grad norm)."""
        return read_steps(self.events)


def run_trainer(args: Sequence[str], nproc: int = 1, log_rank: int | None = 0, check: bool = True,
                timeout: float = 900, cwd: Path = REPO, env: dict[str, str] | None = None) -> Run:
    """Train with `args` (which name the dump folder; TensorBoard is switched on) and wait.
    `check`: a non-zero exit fails with the log's tail."""
    args = [*args, "--metrics.enable_tensorboard"]
    dump = Path(cwd) / dump_folder(args)  # relative dump folders are the trainer's cwd's
    before = set(event_files(dump))
    proc = subprocess.Popen(trainer_cmd(args, nproc, log_rank), cwd=cwd, env=env or trainer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    run = Run(dump, proc.returncode, stdout, stderr,
              [f for f in event_files(dump) if f not in before])
    if check:
        assert run.returncode == 0, run.log[-6000:]
    return run


def seed_checkpoint(args: Sequence[str]) -> list[str]:
    """Write a seed checkpoint with `args` (which name the dump folder) and return the
    arguments that start a run from it: one init for every layout compared (a pipeline
    stage initialises only its own layers, so its random init differs from one process's)."""
    run_trainer([*args, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint"])
    step0 = REPO / dump_folder(args) / "checkpoint" / "step-0"
    return ["--checkpoint.enable", "--checkpoint.initial_load_path", str(step0),
            "--checkpoint.interval", "1000"]


def small_args(dump: Path, steps: int = 10, *extra: str, config: Path = CONFIG) -> list[str]:
    """A few deterministic steps of the debug config (seq 64, batch 2), logged every step."""
    return [
        "--job.config_file", str(config),
        "--job.dump_folder", str(dump),
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--metrics.log_freq", "1",
        "--debug.seed", "0",
        "--debug.deterministic",
        *extra,
    ]

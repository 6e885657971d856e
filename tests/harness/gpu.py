"""What the GPU acceptance stages share with their conftest: the stage context and the time
limit (tests/gpu/)."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


class StageTimeout(Exception):
    """A stage ran past its time limit."""


@dataclasses.dataclass
class Context:
    device: torch.device
    smoke: bool
    out: Path
    """Scratch folder for trainer dumps and datasets."""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self, what: str = "") -> None:
        if not self.cuda:
            pytest.skip("needs CUDA" + (f" ({what})" if what else ""))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (main) thread after `seconds`. A kernel already queued
    finishes first; subprocess stages get the remaining time as their own timeout."""

    def expire(*_: object) -> None:
        raise StageTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

"""The GPU acceptance stages' setting: the device, the scratch folder, each stage's time limit.

Every test here carries `@pytest.mark.gpu(stage=NAME, timeout=SECONDS)` (`multi_gpu` too when
it launches torchrun on several GPUs). Without CUDA they skip, unless
`MOT_GPU_ACCEPTANCE=cpu-smoke` asks for the CPU-capable stages at tiny shapes (what CI runs,
so the stages stay alive between the rare GPU loans). `MOT_GPU_ACCEPTANCE_OUT` keeps the
trainer and benchmark logs in a folder. `python scripts/gpu_acceptance.py` sets both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from harness.gpu import Context, time_limit

SMOKE = os.environ.get("MOT_GPU_ACCEPTANCE") == "cpu-smoke"
SMOKE_TIMEOUT = 300
"""The CPU smoke only guards against hangs (a shared 2-core box is slow and uneven)."""


@pytest.fixture(scope="session")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Context:
    if not SMOKE and not torch.cuda.is_available():
        pytest.skip("needs CUDA (MOT_GPU_ACCEPTANCE=cpu-smoke runs the CPU-capable stages)")
    device = torch.device("cpu" if SMOKE else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(os.environ.get("MOT_GPU_ACCEPTANCE_OUT") or tmp_path_factory.mktemp("gpu_acceptance"))
    out.mkdir(parents=True, exist_ok=True)
    return Context(device, SMOKE, out.resolve())


@pytest.fixture(autouse=True)
def stage_timeout(request: pytest.FixtureRequest) -> Iterator[float]:
    """The stage's time limit, enforced; its name recorded for the runner's table. Compiled
    graphs and cached GPU memory are released after every stage."""
    marker = request.node.get_closest_marker("gpu")
    request.node.user_properties.append(("stage", marker.kwargs["stage"]))
    timeout = SMOKE_TIMEOUT if SMOKE else marker.kwargs["timeout"]
    try:
        with time_limit(timeout):
            yield timeout
    finally:
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

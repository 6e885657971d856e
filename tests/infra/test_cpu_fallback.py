"""The CPU fallback patches stock TorchTitan 0.2.2 so it runs (and averages correctly) on gloo."""

import mmap
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchtitan.config.job_config import Training

from torchtitan_mot.compat import cpu as cpu_fallback
from torchtitan_mot.compat.cpu import HostMemoryMonitor, enable_cpu_fallback

pytestmark = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="the fallback is a no-op with an accelerator"
)


def test_noop_when_an_accelerator_exists(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert enable_cpu_fallback() is False


def test_rebinds_every_device_bound_module_and_is_idempotent():
    assert enable_cpu_fallback() is True
    assert enable_cpu_fallback() is True

    from torchtitan.components import metrics
    from torchtitan.distributed import dual_pipe_v, parallel_dims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.tools import profiling
    from torchtitan.tools import utils as tt_utils

    for module in (tt_utils, metrics, dist_utils, parallel_dims, dual_pipe_v):
        assert module.device_type == "cpu", module.__name__
    for module in (tt_utils, metrics, dist_utils, profiling, dual_pipe_v):
        assert module.device_module is torch.cpu, module.__name__
    assert tt_utils.get_device_info() == ("cpu", torch.cpu)


def test_host_memory_monitor_reports_rss_and_mfu_stays_finite():
    enable_cpu_fallback()
    from torchtitan.components import metrics
    from torchtitan.tools import utils as tt_utils

    monitor = metrics.build_device_memory_monitor()
    assert isinstance(monitor, HostMemoryMonitor)
    base = monitor.get_peak_stats()
    assert isinstance(base, metrics.DeviceMemStats)
    assert 0 < base.max_reserved_gib < monitor.device_capacity_gib
    assert 0 < base.max_reserved_pct < 100
    assert (base.num_alloc_retries, base.num_ooms) == (0, 0)

    # 64 MiB of fresh pages, touched. (A tensor could reuse pages the process's malloc
    # already holds resident, and RSS would not move.)
    block = mmap.mmap(-1, 64 * 1024 * 1024)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    grown = monitor.get_peak_stats()
    assert grown.max_reserved_gib >= base.max_reserved_gib + 0.05
    block.close()
    monitor.reset_peak_stats()
    if Path("/proc/self/clear_refs").exists():
        assert monitor.get_peak_stats().max_reserved_gib < grown.max_reserved_gib

    # Unknown device names fall back to a fixed peak, so the MFU division is safe.
    assert tt_utils.get_peak_flops(monitor.device_name) > 0


def test_fsdp_reduce_ops_are_sum_only():
    enable_cpu_fallback()
    from torch.distributed import ReduceOp
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    class TwoRanks:
        def size(self) -> int:
            return 2

    for factor in (None, 1.0, 2.0):
        pre, post, rs_op, ar_op = _fsdp_collectives._get_gradient_divide_factors(
            TwoRanks(), None, torch.float32, "cpu", factor
        )
        assert (rs_op, ar_op) == (ReduceOp.SUM, ReduceOp.SUM)
        assert pre is None and post == (2.0 if factor is None else factor)


FSDP_GRAD_SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchtitan_mot.compat.cpu import enable_cpu_fallback

    enable_cpu_fallback()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    x = torch.randn(world * 3, 8)
    ref(x).square().mean().backward()  # full-batch gradient, one process

    for divide_factor in (None, 1.0):  # FSDP's own averaging; TorchTitan's "factor 1"
        torch.manual_seed(0)
        model = fully_shard(torch.nn.Linear(8, 4))
        if divide_factor is not None:
            model.set_gradient_divide_factor(divide_factor)
        local = model(x[rank * 3:(rank + 1) * 3]).square().sum() / x.shape[0] / 4
        # Per-rank loss whose SUM over ranks is the full-batch mean (TorchTitan's scaling),
        # or the plain per-rank mean when FSDP averages.
        (local if divide_factor == 1.0 else local * world).backward()
        for p, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), r.grad, rtol=1e-6, atol=1e-7)
    if rank == 0:
        print("FSDP_GRADS_OK")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp_gradients_on_gloo_equal_full_batch_gradients(tmp_path):
    script = tmp_path / "fsdp_grads.py"
    script.write_text(FSDP_GRAD_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
        cwd=repo,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "FSDP_GRADS_OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("native, precision, warns", [
    (False, Training(), True),  # TorchTitan's default: bf16 mixed precision
    (False, Training(mixed_precision_param="float32", dtype="bfloat16"), True),
    (False, Training(mixed_precision_param="float32"), False),
    (True, Training(), False),
])
def test_emulated_bf16_on_cpu_is_named_at_start_up(
    monkeypatch, caplog, native: bool, precision: Training, warns: bool
) -> None:
    enable_cpu_fallback()
    monkeypatch.setattr(cpu_fallback, "_native_bf16_matmul", lambda: native)
    with caplog.at_level("WARNING"):
        cpu_fallback.warn_if_bf16_is_emulated(precision)
    assert ("--training.mixed_precision_param float32" in caplog.text) == warns


@pytest.mark.slow
def test_trainer_start_up_names_emulated_bf16(tmp_path: Path) -> None:
    """The real entry point at TorchTitan's default precision (bf16) on a CPU whose bf16
    matmuls are (made to look) emulated warns before its first step (without that, and in
    float32, it does not: the helper's cases above)."""
    repo = Path(__file__).resolve().parents[2]
    start = ("import runpy, torchtitan_mot.compat.cpu as c; c._native_bf16_matmul = lambda: False; "
             "runpy.run_module('torchtitan_mot.train', run_name='__main__', alter_sys=True)")
    args = ["--job.config_file", str(repo / "train_configs" / "debug_mot.toml"),
            "--job.dump_folder", str(tmp_path), "--training.steps", "1", "--training.seq_len", "32",
            "--training.local_batch_size", "1", "--training.mixed_precision_param", "bfloat16"]
    proc = subprocess.run([sys.executable, "-c", start, *args], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "step:" in log, log[-3000:]
    warning = "bfloat16 on a CPU without native bf16 matmuls"
    assert warning in log and log.index(warning) < log.index("step:"), log[-3000:]

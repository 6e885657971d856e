"""Make stock TorchTitan 0.2.2 train on a CPU-only host (CI, laptops) with gloo.

TorchTitan 0.2.2 assumes an accelerator: it picks `device_type = "cuda"` when none is found,
reads CUDA memory stats, asks gloo for reduce ops it does not have and passes a CUDA device
index to `barrier`. `enable_cpu_fallback()` patches exactly those spots, in place, and only
when `torch.accelerator.is_available()` is False, so GPU runs see stock TorchTitan. It also
keeps the CPU log true: no MFU against an A100's peak, no `lspci` probe, no float32 autocast.
"""

import contextlib
import functools
import importlib
import logging
import os
import re
import resource
import sys
from datetime import timedelta
from types import ModuleType

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.fsdp._fully_shard import _fsdp_collectives

from torchtitan.config.job_config import Training
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils_module
from torchtitan.tools import utils as tt_utils_module
from torchtitan.tools.logging import logger

# TorchTitan modules that bind `device_type` / `device_module` at import time (by value).
_DEVICE_BOUND_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.tools.profiling",
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.dual_pipe_v",
)

_GIB = 1024**3
_enabled = False


def _read_proc_status_kib(field: str) -> int | None:
    """A `VmXXX:` value of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class HostMemoryMonitor:
    """Drop-in for `DeviceMemoryMonitor` that reports this process's host RSS.

    "active" is the current RSS and "reserved" the peak RSS (VmHWM) since the last reset;
    both are percentages of physical RAM. There are no allocator retries or OOM counters on the
    host, so those report 0.
    """

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.device_name = "CPU"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / _GIB
        self.reset_peak_stats()

    @staticmethod
    def _peak_rss_bytes() -> int:
        hwm = _read_proc_status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
        # Not Linux: ru_maxrss is the lifetime peak (bytes on macOS) and cannot be reset.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @staticmethod
    def _current_rss_bytes() -> int:
        rss = _read_proc_status_kib("VmRSS")
        return rss * 1024 if rss is not None else HostMemoryMonitor._peak_rss_bytes()

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        active, peak = self._current_rss_bytes(), self._peak_rss_bytes()
        return DeviceMemStats(
            active / _GIB,
            100 * active / self.device_capacity,
            peak / _GIB,
            100 * peak / self.device_capacity,
            0,
            0,
        )

    def reset_peak_stats(self) -> None:
        # Linux resets VmHWM to the current RSS when "5" is written to clear_refs.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _set_pg_timeouts_cpu(timeout: timedelta, parallel_dims: ParallelDims) -> None:
    """`set_pg_timeouts` for gloo: same barrier-then-shorten, without CUDA device ids.

    Meshes of dimensions a run does not use (e.g. `efsdp` without expert parallel) have
    placeholder groups on torch's "fake" backend, which has no timeout: only gloo groups
    get one (torch warns "Set timeout is now only supported for either nccl or gloo" for
    the others).
    """
    torch.distributed.barrier()
    groups: list[torch.distributed.ProcessGroup | None] = [
        mesh.get_group()
        for mesh in parallel_dims.get_all_one_dimensional_meshes().values()
    ] + [None]
    for group in groups:
        if torch.distributed.get_backend(group) == "gloo":
            c10d._set_pg_timeout(timeout, group)


_stock_get_peak_flops = tt_utils_module.get_peak_flops
_stock_maybe_enable_amp = dist_utils_module.maybe_enable_amp


def _peak_flops_cpu(device_name: str) -> float:
    """0.2.2's `get_peak_flops` runs `lspci` and falls back to an A100's peak for a CPU (two warnings, a meaningless MFU).

    A CPU has no peak to measure MFU against: infinity makes the MFU 0, which
    `MfuNotApplicable` prints as not applicable.
    """
    return float("inf") if device_name == "CPU" else _stock_get_peak_flops(device_name)


class MfuNotApplicable(logging.Filter):
    """0.2.2 prints an MFU in every step line and the peak FLOPS it uses, also on a CPU.

    On the CPU (`_peak_flops_cpu`) both say that MFU does not apply instead.
    """

    _STEP_MFU = re.compile(r"mfu: [0-9.]+%")
    _PEAK = "Peak FLOPS used for computing MFU: inf"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.args:
            if record.msg == self._PEAK:
                record.msg = "MFU: not applicable on a CPU (no peak FLOPS to compare against)"
            elif "mfu: " in record.msg:
                record.msg = self._STEP_MFU.sub("mfu: n/a (CPU)", record.msg)
        return True


def _maybe_enable_amp_cpu(
    parallel_dims: ParallelDims, mixed_precision_param: str, device_type: str
) -> contextlib.AbstractContextManager[None]:
    """0.2.2's `maybe_enable_amp` opens CPU autocast even for float32, which torch rejects with a warning and disables.

    A float32 run gets no autocast context at all (the same computation, without the warning).
    """
    if mixed_precision_param == "float32":
        return contextlib.nullcontext()
    return _stock_maybe_enable_amp(parallel_dims, mixed_precision_param, device_type)


class _ProfileWithoutNoneActivity(torch.profiler.profile):
    """0.2.2's `maybe_enable_profiling` passes `None` as the device activity when there is
    no GPU; the profiler rejects it. Dropping it profiles the CPU alone."""

    def __init__(self, *args, activities=None, **kwargs) -> None:
        if activities is not None:
            activities = [a for a in activities if a is not None]
        super().__init__(*args, activities=activities, **kwargs)


def _init_distributed_cpu(*args, enable_cpu_backend: bool = False, **kwargs) -> int:
    """0.2.2's `init_distributed` adds `cpu:gloo` for CPU offload even when the device
    backend is gloo on the CPU already (`cpu:gloo,cpu:gloo`, rejected)."""
    return _stock_init_distributed(*args, enable_cpu_backend=False, **kwargs)


_stock_init_distributed = dist_utils_module.init_distributed
_stock_gradient_divide_factors = _fsdp_collectives._get_gradient_divide_factors


def _sum_only_gradient_divide_factors(*args, **kwargs):
    """FSDP2 reduce ops restricted to SUM, with the averaging done as a separate division.

    FSDP2 otherwise uses AVG or PREMUL_SUM(1/factor) (TorchTitan sets factor 1.0 because it
    already divides the loss by the global token count); gloo implements neither. Its own
    `force_sum_reduction_for_comms` path yields (pre, post, SUM, SUM) with the same result.
    """
    kwargs["force_sum_reduction_for_comms"] = True
    if len(args) > 5:  # positional force_sum_reduction_for_comms
        args = args[:5]
    return _stock_gradient_divide_factors(*args, **kwargs)


def _permute_indices_on_host(tokens_per_expert_group: torch.Tensor, *args, **kwargs):
    """0.2.2's expert-parallel `_permute` calls `generate_permute_indices` without `use_cpu`,
    so CPU tensors reach its Triton kernel (no driver on a CPU host); use its CPU path."""
    from torchtitan.models.moe import kernels

    kwargs["use_cpu"] = tokens_per_expert_group.device.type == "cpu"
    return kernels.generate_permute_indices(tokens_per_expert_group, *args, **kwargs)


def _rebind_device(module: ModuleType) -> None:
    if hasattr(module, "device_type"):
        module.device_type = "cpu"
    if hasattr(module, "device_module"):
        module.device_module = torch.cpu


def _native_bf16_matmul() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_bf16_is_emulated(training: Training) -> None:
    """TorchTitan's default precision (bf16) on a CPU without native bf16 matmuls (no
    AVX512-BF16 / AMX) trains correctly but tens of times slower than fp32: say so, naming
    the setting, instead of leaving a CPU user with a run that seems to hang."""
    if not _enabled or "bfloat16" not in (training.mixed_precision_param, training.dtype):
        return
    if not _native_bf16_matmul():
        logger.warning(
            "training.mixed_precision_param / training.dtype is bfloat16 on a CPU without "
            "native bf16 matmuls: they run tens of times slower than float32; for a CPU run "
            "set --training.mixed_precision_param float32 (and --training.dtype float32)"
        )


def enable_cpu_fallback() -> bool:
    """Patch TorchTitan 0.2.2 to run on CPU with gloo; returns whether it did.

    Idempotent. A no-op (False) when an accelerator is present. Call it before the Trainer is
    built: modules imported afterwards pick up the rebound device from `torchtitan.tools.utils`.
    """
    global _enabled
    if torch.accelerator.is_available():
        return False
    if _enabled:
        return True

    from torchtitan.components import metrics
    from torchtitan.models.llama3.infra import parallelize as llama3_parallelize
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.moe import utils as moe_utils
    from torchtitan.tools import utils as tt_utils

    # 0.2.2 falls back to device_type "cuda" / torch.cuda when no accelerator is found; it
    # also derives the gloo backend from device_type ("cpu" -> gloo) in init_distributed.
    tt_utils.get_device_info = lambda: ("cpu", torch.cpu)
    for name in _DEVICE_BOUND_MODULES:
        _rebind_device(importlib.import_module(name))
    # Also catch any other torchtitan module already imported with the stale binding.
    for name, module in list(sys.modules.items()):
        if name.startswith("torchtitan.") and module is not None:
            if getattr(module, "device_module", None) is getattr(torch, "cuda", None):
                _rebind_device(module)

    # 0.2.2 DeviceMemoryMonitor reads torch.cuda memory stats and device properties.
    metrics.DeviceMemoryMonitor = HostMemoryMonitor
    # 0.2.2 set_pg_timeouts calls barrier(device_ids=["cpu"]) (gloo: TypeError) and synchronize.
    dist_utils.set_pg_timeouts = _set_pg_timeouts_cpu
    # FSDP2 reduce-scatter asks for AVG / PREMUL_SUM, which gloo rejects; force SUM + division.
    _fsdp_collectives._get_gradient_divide_factors = _sum_only_gradient_divide_factors
    # 0.2.2's init_distributed asks for `cpu:gloo` twice on a CPU host.
    dist_utils.init_distributed = _init_distributed_cpu
    # 0.2.2's apply_fsdp offloads to pinned host memory; pinning needs an accelerator, and
    # on a CPU-only host the offloaded shards are host memory either way.
    llama3_parallelize.CPUOffloadPolicy = functools.partial(CPUOffloadPolicy, pin_memory=False)
    # 0.2.2's maybe_enable_profiling passes `None` as the device activity without a GPU.
    torch.profiler.profile = _ProfileWithoutNoneActivity
    # 0.2.2 measures a CPU's MFU against an A100 (after probing lspci) and autocasts float32.
    tt_utils.get_peak_flops = _peak_flops_cpu
    logger.addFilter(MfuNotApplicable())
    dist_utils.maybe_enable_amp = _maybe_enable_amp_cpu
    # 0.2.2's expert-parallel token permutation runs a Triton kernel on CPU tensors.
    moe_utils.generate_permute_indices = _permute_indices_on_host

    _enabled = True
    return True

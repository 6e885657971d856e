"""Every workaround for a limit of TorchTitan 0.2.2 (or of the torch it runs on) lives here.

Each function names the upstream limit it works around in its first docstring line. The
version check below makes a TorchTitan upgrade fail loudly at import, so each workaround is
revisited instead of silently patching code that has moved.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Protocol

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer
from torchtitan.config.job_config import Parallelism
from torchtitan.distributed import utils as dist_utils

SUPPORTED_TORCHTITAN = "0.2.2"

if version("torchtitan") != SUPPORTED_TORCHTITAN:
    raise ImportError(
        f"torchtitan_mot supports torchtitan=={SUPPORTED_TORCHTITAN} only (installed: "
        f"{version('torchtitan')}); its workarounds in torchtitan_mot/compat target that release"
    )


def isolate_compile_cache_per_rank() -> None:
    """torch 2.13's AOTAutograd cache key of a DTensor ignores the rank (pytorch#188390), so
    ranks sharing a cache load graphs traced for another rank's process groups or device.

    Gives each rank of a multi-process run its own subfolder of the inductor cache (read from
    TORCHINDUCTOR_CACHE_DIR, which torch consults lazily), so warm restarts keep their cache.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            cache_dir(), f"rank{os.environ['RANK']}"
        )


class MoTLossRecords(Protocol):
    """The per-call records of `torchtitan_mot.loss.MoTLoss`."""

    @property
    def n_records(self) -> int: ...

    def discard_records(self, start: int, count: int) -> None: ...


@contextmanager
def clipped_grad_norm_to(sink: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """0.2.2's `Trainer.train_step` keeps the clipped total norm to itself until logging.

    Within the context every `dist_utils.clip_grad_norm_` result is also handed to `sink`
    (the non-finite guard), which then needs no second pass over the gradients.
    """
    clip = dist_utils.clip_grad_norm_

    def clip_and_report(*args, **kwargs) -> torch.Tensor:
        total_norm = clip(*args, **kwargs)
        sink(total_norm)
        return total_norm

    dist_utils.clip_grad_norm_ = clip_and_report
    try:
        yield
    finally:
        dist_utils.clip_grad_norm_ = clip


def discard_pipeline_metadata_loss(
    loss_fn: MoTLossRecords, first: int, parallelism: Parallelism, local_batch: int
) -> None:
    """torch's pipeline schedules call the loss once more, on real data, the first time they
    run (backward metadata inference); that call is no training microbatch.

    Drops the records of such extra calls made since record `first`, so the per-modality
    losses of the first step cover exactly its microbatches.
    """
    microbatches = local_batch // parallelism.pipeline_parallel_microbatch_size
    extra = loss_fn.n_records - first - microbatches
    if extra > 0:
        loss_fn.discard_records(first, extra)


def shard_on_host_for_context_parallel(
    ids: torch.Tensor, cp_mesh: DeviceMesh, load_balancer_type: str | None
) -> torch.Tensor | None:
    """0.2.2's `cp_shard` builds its load-balancer index on the mesh's device, so host
    tensors would have to go to the device (and MoT's ids back to the host).

    Shards a host (batch, seq) tensor exactly as `cp_shard` shards the tokens (the same
    head-tail reordering, then this rank's chunk of the sequence), without the device.
    Returns None for the "ptrr" balancer, whose order depends on the device-side BlockMask.
    """
    if load_balancer_type not in (None, "headtail"):
        return None
    world, rank = cp_mesh.size(0), cp_mesh.get_local_rank()
    if load_balancer_type == "headtail":
        index = _HeadTailLoadBalancer(ids.shape[1], world, "cpu")._generate_indices()
        ids = ids.index_select(1, index[0])
    return ids.chunk(world, dim=1)[rank]

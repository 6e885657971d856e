"""Training entry point: `python -m torchtitan_mot.train --job.config_file X.toml [overrides]`.

Works as a single process (it fills in the torchrun environment itself) and under
`torchrun --nproc_per_node=N`. It runs TorchTitan's own `main` with `MoTTrainer`, a `Trainer`
subclass that fixes two 0.2.2 gradient-scaling bugs (pipeline parallel, DDP) and feeds the
per-modality loss statistics to the metrics processor.
"""

import os
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torchtitan.train
from torch.distributed._composable.replicate import DDP as ReplicatedModule
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.components.loss import LossFunction

from torchtitan_mot.compat import (
    discard_pipeline_metadata_loss,
    isolate_compile_cache_per_rank,
)
from torchtitan_mot.data.dataset import fill_modalities_from_meta
from torchtitan_mot.infra.cpu import enable_cpu_fallback
from torchtitan_mot.infra.inputs import keep_modality_ids_on_host, split_mot_batch
from torchtitan_mot.reliability import ReliabilityMixin

DEFAULT_CONFIG_MODULE = "torchtitan_mot.config"
_CONFIG_MODULE_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")


class GlobalTokenScaledLoss:
    """Loss wrapper that divides the summed loss by the step's global valid-token count.

    The divisor is set by `MoTTrainer.forward_backward_step` for the duration of one pipeline
    step and is 1 otherwise, so validation through the same schedule sees the plain sum.
    """

    def __init__(self, loss_fn: LossFunction):
        self.loss_fn = loss_fn
        self.divisor: torch.Tensor | float = 1.0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.loss_fn(*args, **kwargs) / self.divisor


def _allreduce_sum_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook that sums gradients instead of averaging them."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class MoTTrainer(ReliabilityMixin, torchtitan.train.Trainer):
    """TorchTitan `Trainer` with correct gradient scale under PP and DDP.

    Gradient scale. TorchTitan normalises the loss as `sum over the step's tokens of CE /
    global valid tokens`: the loss function returns a SUM, and without PP `forward_backward_step`
    divides by `global_valid_tokens` before `backward`, so FSDP (whose gradient division
    TorchTitan turns off) sums already-normalised gradients.

    PP bug (0.2.2). With PP the schedule calls the loss function on the last stage and runs
    backward on its output inside `pp_schedule.step`; `forward_backward_step` divides the summed
    losses by `global_valid_tokens` only afterwards, for logging. The gradients are therefore
    those of the token SUM, `global_valid_tokens` times too large (the grad norm explodes and
    clipping hides a wrong update). Fix: the schedule's loss function is replaced by
    `GlobalTokenScaledLoss`, whose divisor is set to `global_valid_tokens` for each step, so
    backward runs on the normalised loss; the parent then divides the (already normalised)
    losses by 1.

    DDP bug (0.2.2). `apply_ddp` uses `replicate`, whose all-reduce AVERAGES over the dp ranks on
    top of the global-token normalisation, leaving gradients 1/dp too small. Fix: a comm hook
    that SUMS is registered on every replicated model part.
    """

    def __init__(self, job_config: JobConfig):
        super().__init__(job_config)
        self.metrics_processor.loss_fn = self.loss_fn

        self.pp_loss_fn: GlobalTokenScaledLoss | None = None
        if self.parallel_dims.pp_enabled:
            self.pp_loss_fn = GlobalTokenScaledLoss(self.loss_fn)
            # The schedule reads `_loss_fn` lazily at each step (torch.distributed.pipelining).
            self.pp_schedule._loss_fn = self.pp_loss_fn

        replicated = [m for m in self.model_parts if isinstance(m, ReplicatedModule)]
        if replicated:
            group = self.parallel_dims.get_mesh("dp_replicate").get_group()
            for module in replicated:
                module.register_comm_hook(group, _allreduce_sum_hook)

    def batch_generator(
        self, data_iterable: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """TorchTitan's batches with `modality_ids` kept in host memory, where the model
        counts the tokens per modality without a device->host copy."""
        return keep_modality_ids_on_host(super().batch_generator(data_iterable))

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """`modality_ids` travel in `extra_kwargs` (every pipeline stage needs them) and are
        sharded with the tokens under context parallel (`split_mot_batch`)."""
        return split_mot_batch(
            input_dict, labels, self.model_parts[0], self.tokenizer,
            self.parallel_dims, self.job_config, self.device,
        )

    def forward_backward_step(
        self,
        *,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        if self.pp_loss_fn is None:
            return super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        self.pp_loss_fn.divisor = global_valid_tokens
        records = getattr(self.loss_fn, "n_records", 0)
        try:
            # Losses come back already divided; the parent's division must be a no-op.
            loss = super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=1.0
            )
        finally:
            self.pp_loss_fn.divisor = 1.0
        if self.pp_has_last_stage and hasattr(self.loss_fn, "discard_records"):
            discard_pipeline_metadata_loss(
                self.loss_fn, records, self.job_config.parallelism, labels.shape[0]
            )
        return loss

    def train_step(self, data_iterator) -> None:
        # Per-modality stats are logged for this step only, like the total loss: drop what
        # accumulated since the last log (earlier unlogged steps, validation).
        if hasattr(self.loss_fn, "pop_modality_stats"):
            self.loss_fn.pop_modality_stats()
        super().train_step(data_iterator)


class _MoTConfigManager(ConfigManager):
    """ConfigManager whose `job.custom_config_module` defaults to `torchtitan_mot.config` and
    whose unset `[mot].modalities` / `codebook_sizes` come from the dataset's meta.json."""

    def parse_args(self, args: list[str] | None = None) -> JobConfig:
        args = list(sys.argv[1:] if args is None else args)
        given = any(a.split("=", 1)[0] in _CONFIG_MODULE_FLAGS for a in args)
        toml_values = self._maybe_load_toml(args) or {}
        if not given and not toml_values.get("job", {}).get("custom_config_module"):
            args += [_CONFIG_MODULE_FLAGS[0], DEFAULT_CONFIG_MODULE]
        job_config = super().parse_args(args)
        if hasattr(job_config, "mot"):
            # Before the trainer copies [mot] anywhere (e.g. into the optimizer config).
            fill_modalities_from_meta(job_config)
        return job_config


def _default_single_process_env() -> None:
    """Fill in the torchrun environment for a plain `python -m` run (rank 0 of 1)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def main() -> None:
    _default_single_process_env()
    isolate_compile_cache_per_rank()
    enable_cpu_fallback()
    import torchtitan_mot  # noqa: F401  registers the "mot" TrainSpec

    # 0.2.2's main() builds `ConfigManager()` and calls `parse_args()`, whose default binds
    # sys.argv at import time; swap in the subclass that adds our config module.
    torchtitan.train.ConfigManager = _MoTConfigManager
    torchtitan.train.main(MoTTrainer)


if __name__ == "__main__":
    main()

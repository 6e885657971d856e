"""`MoTTrainer`: TorchTitan's `Trainer` with what MoT needs around each step.

- modality ids stay on the host and reach every pipeline stage, sharded with the tokens
  under context parallel (`infra.modality_ids`);
- per-modality optimizer settings (`optimizer`), per-modality losses in the step log
  (`metrics`), from loss statistics the trainer owns (`loss.ModalityLossStats`);
- the non-finite loss guard (`nonfinite_guard`) and the start-up checkpoint check
  (`checkpoint_check`);
- the correct gradient scale under pipeline parallel and DDP, which 0.2.2 gets wrong
  (`compat.torchtitan_0_2_2`: `GlobalTokenScaledLoss`, `sum_gradients_over_replicas`), and
  MoE token counts under PP that leave out the schedule's metadata-inference forward
  (`keep_moe_counts_out_of_pipeline_metadata`).

Gradient scale. TorchTitan normalises the loss as `sum over the step's tokens of CE / global
valid tokens`: the loss function returns a SUM, and without PP `forward_backward_step` divides
by `global_valid_tokens` before `backward`, so FSDP (whose gradient division TorchTitan turns
off) sums already-normalised gradients. Under PP the division has to happen inside the
schedule's loss, and under DDP the replicas' gradients have to be summed, not averaged.

Transfusion (`[mot].diffusion_modalities`). Before a step's first forward the trainer counts
the images of all its microbatches on the host and sums the count over the data-parallel
ranks; each microbatch's x0 is noised on the device with `DiffusionSchedule.add_noise`
(`loss.noise_batch`) and the loss gets the epsilon target, the image ids and the weight
`global valid tokens / global images` (`loss.MoTLoss` says why).

Wiring. The trainer owns the loss statistics and the non-finite guard and builds them
first; the parent's builders get them as arguments (`_with_owned_objects`), since TorchTitan
fixes the builders' signatures (`compat.train_spec_as`).
"""

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torchtitan.train
from torchtitan.distributed import utils as dist_utils
from torchtitan.config import JobConfig
from torchtitan.protocols.train_spec import TrainSpec

from torchtitan_mot.compat.cpu import warn_if_bf16_is_emulated
from torchtitan_mot.compat.torchtitan_0_2_2 import (
    GlobalTokenScaledLoss,
    keep_moe_counts_out_of_pipeline_metadata,
    pipeline_metadata_loss_calls,
    set_pipeline_loss,
    sum_gradients_over_replicas,
    train_spec_as,
)
from torchtitan_mot.infra.modality_ids import split_mot_batch
from torchtitan_mot.model.inputs import keep_modality_ids_on_host
from torchtitan_mot.trainer.checkpoint_check import check_start_checkpoint
from torchtitan_mot.model.schedule import DiffusionSchedule
from torchtitan_mot.trainer.loss import (
    count_images,
    ModalityLossStats,
    noise_batch,
    pack_target,
    training_device,
)
from torchtitan_mot.trainer.nonfinite_guard import NonFiniteLossGuard
from torchtitan_mot.trainer.optimizer import MoTOptimizersContainer, use_modality_optimizer_settings


class MoTTrainer(torchtitan.train.Trainer):
    """TorchTitan `Trainer` for MoT (see the module docstring for what it adds)."""

    def __init__(self, job_config: JobConfig) -> None:
        # The parent builds the optimizer from `job_config.optimizer`: give it the [mot] settings.
        use_modality_optimizer_settings(job_config)
        warn_if_bf16_is_emulated(job_config.training)
        self.loss_stats = ModalityLossStats(job_config.mot.modalities, training_device())
        self.nonfinite_guard = NonFiniteLossGuard(job_config.mot.nan_policy, self.loss_stats)
        self.diffusion_schedule: DiffusionSchedule | None = None
        if job_config.mot.diffusion_modalities:
            self.diffusion_schedule = DiffusionSchedule(
                job_config.mot.diffusion_timesteps, job_config.mot.diffusion_schedule
            )
        self._image_weight: torch.Tensor | float = 1.0
        self._global_images: torch.Tensor | None = None
        with train_spec_as(self._with_owned_objects):
            super().__init__(job_config)
        if not isinstance(self.optimizers, MoTOptimizersContainer):
            raise ValueError(
                "the non-finite loss guard needs torchtitan_mot's optimizer container "
                f"(build_mot_optimizers); got {type(self.optimizers).__name__} "
                "(optimizer.early_step_in_backward and fault tolerance are not supported)"
            )
        check_start_checkpoint(
            self.checkpointer, job_config, self.model_parts, stage_only=self.parallel_dims.pp_enabled
        )

        self.pp_loss_fn: GlobalTokenScaledLoss | None = None
        if self.parallel_dims.pp_enabled:
            self.pp_loss_fn = GlobalTokenScaledLoss(self.loss_fn)
            set_pipeline_loss(self.pp_schedule, self.pp_loss_fn)
            keep_moe_counts_out_of_pipeline_metadata(self.pp_schedule, self.model_parts)
        sum_gradients_over_replicas(self.model_parts, self.parallel_dims)

    def _with_owned_objects(self, spec: TrainSpec) -> TrainSpec:
        """`spec` with the loss statistics bound into the loss and metrics builders and the
        non-finite guard into the optimizer builder."""
        return dataclasses.replace(
            spec,
            build_loss_fn=functools.partial(spec.build_loss_fn, loss_stats=self.loss_stats),
            build_metrics_processor_fn=functools.partial(
                spec.build_metrics_processor_fn, loss_stats=self.loss_stats
            ),
            build_optimizers_fn=functools.partial(
                spec.build_optimizers_fn, step_guard=self.nonfinite_guard
            ),
        )

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
        sharded with the tokens under context parallel (`split_mot_batch`). A Transfusion
        batch is noised first; under pipeline parallel its loss target travels packed with
        the labels (`pack_target`), which the schedule splits per microbatch."""
        target = None
        if self.diffusion_schedule is not None:
            input_dict, target = noise_batch(input_dict, self.diffusion_schedule)
            target.image_weight = self._image_weight
        inputs, labels, extra_inputs, extra_kwargs = split_mot_batch(
            input_dict, labels, self.model_parts[0], self.tokenizer,
            self.parallel_dims, self.job_config, self.device,
        )
        if target is not None:
            if self.parallel_dims.pp_enabled:
                labels, target = pack_target(labels, target), None
            self.loss_fn.target = target
        return inputs, labels, extra_inputs, extra_kwargs

    def forward_backward_step(
        self,
        *,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """The parent's step (under PP with the loss normalised inside the schedule); the
        loss is handed to the non-finite guard."""
        if self._global_images is not None:
            # lambda * sum of per-image MSE * N_tok / N_img, divided by N_tok by the parent
            self._image_weight = global_valid_tokens / self._global_images.clamp(min=1)
        if self.pp_loss_fn is None:
            loss = super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        else:
            first = self.loss_stats.n_records
            with self.pp_loss_fn.dividing_by(global_valid_tokens):
                # Losses come back already divided; the parent's division must be a no-op.
                loss = super().forward_backward_step(
                    input_dict=input_dict, labels=labels, global_valid_tokens=1.0
                )
            if self.pp_has_last_stage:
                extra = pipeline_metadata_loss_calls(
                    self.loss_stats.n_records - first, self.job_config.parallelism, labels.shape[0]
                )
                self.loss_stats.discard(first, extra)
        self.nonfinite_guard.record(loss)
        return loss

    def train_step(
        self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]
    ) -> None:
        # Per-modality stats are logged for this step only, like the total loss: drop what
        # accumulated since the last log (earlier unlogged steps).
        self.loss_stats.pop()
        if self.diffusion_schedule is not None:
            data_iterator = self._count_images(data_iterator)
        with self.nonfinite_guard.guarding(self.step):
            super().train_step(data_iterator)

    def _count_images(
        self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Take the step's microbatches, set the global image count (summed over the
        data-parallel ranks, as TorchTitan sums the valid tokens), return them to replay."""
        batches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        local = sum(count_images(input_dict["image_ids"]) for input_dict, _ in batches)
        images = torch.tensor(float(local), device=self.device)
        if self.parallel_dims.dp_enabled:
            images = dist_utils.dist_sum(images, self.parallel_dims.get_mesh("batch"))
        self._global_images = torch.as_tensor(images, device=self.device)
        return iter(batches)

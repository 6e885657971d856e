"""Validation with per-modality losses on the held-out split of the MoT dataset.

TorchTitan's `Validator` reads a text dataset (its `build_text_validation_dataloader`) and
logs one loss. An MoT run needs the modality ids to reach the model and the loss per
modality (the paper compares modalities separately), so `MoTValidator` reads
`[validation].dataset_path` through `build_mot_validation_dataloader` and reports
`validation/loss` and `validation/loss/<modality>`, each a token-weighted mean CE:
summed CE over the evaluated tokens / their count, summed over all ranks first.

Transfusion: `validation/loss/<diffusion modality>` is the mean per-image diffusion MSE at the
validation split's fixed stratified timesteps (the dataset's), and `validation/loss` the LM CE
per token + lambda times it, the training objective's value.
"""

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torchtitan.components.loss import LossFunction
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.validate import BaseValidator, ValidationContext
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from torchtitan_mot.compat.torchtitan_0_2_2 import set_pipeline_loss
from torchtitan_mot.data.dataloader import build_mot_validation_dataloader
from torchtitan_mot.data.tokenizer import MultimodalTokenizer
from torchtitan_mot.infra.modality_ids import split_mot_batch
from torchtitan_mot.model.inputs import keep_modality_ids_on_host
from torchtitan_mot.model.schedule import DiffusionSchedule
from torchtitan_mot.trainer.loss import (
    diffusion_loss_kwargs,
    ModalityLossStats,
    MoTLoss,
    noise_batch,
    pack_target,
    training_device,
)


class MoTValidator(BaseValidator):
    """Validation over the MoT validation split, with per-modality losses.

    Uses its OWN `MoTLoss` and `ModalityLossStats` (unweighted, same vocabulary layout), so
    the trainer's loss statistics, which feed the training log, never see validation tokens.
    Every call evaluates the same batches: the dataset is rewound to its initial state
    first, so successive validation points are comparable.
    """

    def __init__(
        self,
        job_config: JobConfig,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: MultimodalTokenizer,
        parallel_dims: ParallelDims,
        loss_fn: LossFunction,
        validation_context: ValidationContext,
        maybe_enable_amp: AbstractContextManager[None],
        metrics_processor: MetricsProcessor,
        pp_schedule: _PipelineSchedule | None = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ) -> None:
        if job_config.validation.seq_len > job_config.training.seq_len:
            raise ValueError(
                f"validation.seq_len={job_config.validation.seq_len} exceeds training.seq_len="
                f"{job_config.training.seq_len}, the longest sequence the model's RoPE table covers"
            )
        # Not a `Validator`: its __init__ builds a text-only dataloader, and every method it
        # adds is replaced here (same constructor arguments, as the trainer passes them).
        super().__init__(job_config)
        del loss_fn  # the trainer's loss accumulates training stats; see the class docstring
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        layout = tokenizer.layout
        self.loss_stats = ModalityLossStats(layout.modalities, training_device())
        self.diffusion = diffusion_loss_kwargs(job_config)
        self.loss_fn = MoTLoss(layout.token_modality_table(), self.loss_stats, **self.diffusion)
        self.diffusion_schedule = (
            DiffusionSchedule(job_config.mot.diffusion_timesteps, job_config.mot.diffusion_schedule)
            if self.diffusion
            else None
        )
        # Same convention as TorchTitan: a fixed step count re-loops a short split, so every
        # data-parallel rank runs the same number of (collective) forwards.
        self.validation_dataloader = build_mot_validation_dataloader(
            dp_world_size,
            dp_rank,
            tokenizer,
            job_config,
            infinite=job_config.validation.steps != -1,
        )
        self._initial_data_state = self.validation_dataloader.dataset.state_dict()
        if job_config.validation.steps == -1:
            logger.warning(
                "validation.steps = -1 reads the whole split; ranks with fewer batches "
                "than others will hang in FSDP collectives"
            )

    def post_dataloading_process(
        self,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        model_parts: list[nn.Module],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """As `MoTTrainer.post_dataloading_process`: `modality_ids` go to `extra_kwargs`
        (every pipeline stage needs them) and are sharded with the tokens under context
        parallel; the parent would leave them on the first stage, unsharded."""
        target = None
        if self.diffusion_schedule is not None:
            input_dict, target = noise_batch(input_dict, self.diffusion_schedule)
        inputs, labels, extra_inputs, extra_kwargs = split_mot_batch(
            input_dict, labels, model_parts[0], self.tokenizer,
            self.parallel_dims, self.job_config, input_dict["input"].device,
        )
        if target is not None:
            if self.parallel_dims.pp_enabled:
                labels, target = pack_target(labels, target), None
            self.loss_fn.target = target
        return inputs, labels, extra_inputs, extra_kwargs

    def _forward(
        self,
        model_parts: list[nn.Module],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        extra_inputs: dict[str, torch.Tensor],
        extra_kwargs: dict[str, Any],
    ) -> None:
        """One batch through the model; the loss lands in `self.loss_stats`."""
        with self.validation_context():
            if not self.parallel_dims.pp_enabled:
                with self.maybe_enable_amp:
                    self.loss_fn(model_parts[0](inputs, **extra_inputs, **extra_kwargs), labels)
                return
            assert self.pp_schedule is not None
            # The schedule calls its loss on the last stage; point it at ours for this batch.
            train_loss = set_pipeline_loss(self.pp_schedule, self.loss_fn)
            try:
                targets, losses = (labels, []) if self.pp_has_last_stage else (None, None)
                if self.pp_has_first_stage:
                    self.pp_schedule.eval(
                        inputs, **extra_inputs, **extra_kwargs, target=targets, losses=losses
                    )
                else:
                    self.pp_schedule.eval(**extra_kwargs, target=targets, losses=losses)
            finally:
                set_pipeline_loss(self.pp_schedule, train_loss)

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum over the loss mesh (dp x cp) and over pipeline stages (only the last has a
        loss; the others contribute zeros), so every rank logs the true global value."""
        for name in ("loss", "pp"):
            mesh = self.parallel_dims.get_optional_mesh(name)
            if mesh is not None:
                stats = funcol.all_reduce(stats, reduceOp="sum", group=mesh)
        return stats

    @torch.no_grad()
    def validate(self, model_parts: list[nn.Module], step: int) -> dict[str, float]:
        """Evaluate `validation.steps` batches, log and return the mean losses."""
        for model in model_parts:
            model.eval()
        device_type = utils.device_type
        self.validation_dataloader.dataset.load_state_dict(self._initial_data_state)
        self.loss_stats.pop()  # nothing should be there; start clean regardless

        max_steps = self.job_config.validation.steps
        num_steps = 0
        for input_dict, labels in keep_modality_ids_on_host(self.validation_dataloader):
            if max_steps != -1 and num_steps >= max_steps:
                break
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            input_dict = {
                k: v.to(device_type) if isinstance(v, torch.Tensor) else v
                for k, v in input_dict.items()
            }
            labels = labels.to(device_type)
            inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(
                input_dict, labels, model_parts
            )
            self._forward(model_parts, inputs, labels, extra_inputs, extra_kwargs)
            num_steps += 1

        sums, counts = self.loss_stats.pop()
        sums, counts = self._reduce(torch.stack([sums.float(), counts.float()])).cpu()
        if counts.sum() == 0:
            raise RuntimeError(
                f"validation saw no target tokens: is {self.job_config.validation.dataset_path} "
                "(split 'validation') shorter than one seq_len window?"
            )
        losses = {"validation/loss": (sums.sum() / counts.sum()).item()}
        if self.diffusion:
            m = self.diffusion["diffusion_modality"]
            ce = torch.cat([sums[:m], sums[m + 1 :]]).sum() / torch.cat([counts[:m], counts[m + 1 :]]).sum()
            mse = sums[m] / counts[m].clamp(min=1)
            losses["validation/loss"] = (ce + self.diffusion["diffusion_weight"] * mse).item()
        for name, mean in self.loss_stats.means(sums, counts).items():
            losses[f"validation/loss/{name}"] = mean

        self.metrics_processor.log_validation(
            loss=losses["validation/loss"], step=step, extra_metrics=losses
        )
        logger.info(
            f"validate step: {step:2}  "
            + "  ".join(f"{k.removeprefix('validation/')}: {v:8.5f}" for k, v in losses.items())
        )
        for model in model_parts:
            model.train()
        return losses


def build_mot_validator(**kwargs: Any) -> MoTValidator:
    """`TrainSpec.build_validator_fn` for MoT (TorchTitan's Trainer passes keyword arguments,
    always including its metrics processor, through which the validator logs)."""
    return MoTValidator(**kwargs)

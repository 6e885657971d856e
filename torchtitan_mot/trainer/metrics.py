"""Metrics processor that adds per-modality losses to TorchTitan's step log.

The total loss says little about an MoT run: the modalities learn at different speeds and the
paper's comparisons are per modality. The loss records per-modality summed CE and token
counts in the trainer's `ModalityLossStats`; at each log step this processor pops them,
all-reduces them over the loss mesh and logs `loss/<modality>` = global sum / global count,
next to the usual metrics. A model with MoE FFNs also logs its expert load (`ExpertLoad`):
the share of tokens each expert got, per MoE modality and layer.
"""

import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from torchtitan.components.metrics import MetricsProcessor
from torch import nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols import BaseModelArgs
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import NoColor

from torchtitan_mot.model.args import MoTModelArgs, UNTIE_COMPONENTS
from torchtitan_mot.model.moe import MoTMoEFeedForward
from torchtitan_mot.trainer.loss import ModalityLossStats


class ExpertLoad:
    """Tokens routed to each expert of every MoE module since the last log, keyed by
    (modality, layer); modality "all" is the shared MoE FFN of the MoE-4x baseline.

    `record` runs as an optimizer step pre-hook registered before TorchTitan's load-balancing
    hook, which resets each module's `tokens_per_expert` (without load balancing `record`
    resets them itself). Shares, not raw counts, are logged: full activation checkpointing
    counts a recomputed block twice, which leaves the shares unchanged.
    """

    def __init__(self, moes: dict[tuple[str, str], nn.Module]) -> None:
        self.moes = moes
        self.counts: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def of(cls, model_parts: list[nn.Module], modalities: list[str]) -> "ExpertLoad | None":
        """The MoE modules of `model_parts` (None without any)."""
        moes = {}
        for part in model_parts:
            for layer, block in part.get_submodule("layers").items():
                for ffn in (m for m in block.modules() if isinstance(m, MoTMoEFeedForward)):
                    for s, moe in ffn.moe.items():
                        name = "all" if ffn.n_sets == 1 else (
                            modalities[int(s)] if modalities else f"modality{s}"
                        )
                        moes[(name, layer)] = moe
        return cls(moes) if moes else None

    @torch.no_grad()
    def record(self) -> None:
        for key, moe in self.moes.items():
            count = moe.tokens_per_expert.detach().float()
            self.counts[key] = self.counts[key] + count if key in self.counts else count.clone()
            if moe.load_balance_coeff is None:
                moe.tokens_per_expert.zero_()

    def pop(self, loss_mesh: Any = None) -> dict[tuple[str, str], torch.Tensor]:
        """Counts since the last pop, summed over `loss_mesh` (a collective: every rank of it
        calls this at the same step). Empty before the first optimizer step."""
        if not self.counts:
            return {}
        keys = list(self.counts)
        stacked = torch.stack([self.counts[k] for k in keys])
        if loss_mesh is not None:
            # waited: the result is pickled (gather_stage_counts), which a pending
            # AsyncCollectiveTensor cannot be
            stacked = funcol.all_reduce(stacked, reduceOp="sum", group=loss_mesh).wait()
        self.counts = {}
        return dict(zip(keys, stacked.cpu()))


def gather_stage_counts(
    counts: dict[tuple[str, str], torch.Tensor], pp_mesh: Any
) -> dict[tuple[str, str], torch.Tensor]:
    """Every pipeline stage's expert counts (host tensors, keyed by (modality, layer)) on
    every rank of `pp_mesh`: a stage holds only its own layers' MoE modules, and the metrics
    rank is on the last stage. A collective over `pp_mesh`, at log steps only; host objects,
    because the stages hold different keys (possibly none)."""
    stages: list[dict[tuple[str, str], torch.Tensor] | None] = [None] * pp_mesh.size()
    dist.all_gather_object(stages, counts, group=pp_mesh.get_group())
    merged: dict[tuple[str, str], torch.Tensor] = {}
    for stage in stages:
        merged.update(stage or {})
    return merged


def expert_load_metrics(counts: dict[tuple[str, str], torch.Tensor]) -> tuple[dict[str, float], str]:
    """TensorBoard scalars `moe/<modality>/layer<i>/expert<j>` (share of the layer's tokens)
    and `moe/<modality>/max_load` (the largest expert share over the mean share, worst layer;
    1.0 is perfectly balanced), and a console line with the shares averaged over layers."""
    metrics: dict[str, float] = {}
    shares_by_modality: dict[str, list[torch.Tensor]] = {}
    for (name, layer), count in counts.items():
        share = count / count.sum().clamp_min(1)
        shares_by_modality.setdefault(name, []).append(share)
        metrics.update({f"moe/{name}/layer{layer}/expert{j}": float(v) for j, v in enumerate(share)})
    parts = []
    for name, shares in shares_by_modality.items():
        worst = max(float(s.max() * s.numel()) for s in shares)
        metrics[f"moe/{name}/max_load"] = worst
        mean = torch.stack(shares).mean(0)
        parts.append(f"moe/{name}: max_load {worst:.2f} experts [{' '.join(f'{v:.2f}' for v in mean)}]")
    return metrics, "  ".join(parts)


class MoTMetricsProcessor(MetricsProcessor):
    """`MetricsProcessor` that also logs the mean CE of each modality.

    The per-modality figures come from the trainer's `loss_stats`; without them this
    behaves exactly like the stock processor. Colour codes go to a terminal only: piped
    into a file they are noise.
    """

    def __init__(
        self,
        job_config: JobConfig,
        parallel_dims: ParallelDims,
        tag: str | None = None,
        loss_stats: ModalityLossStats | None = None,
    ) -> None:
        super().__init__(job_config, parallel_dims, tag)
        self.loss_stats = loss_stats
        self.has_moe = False  # whether the model has MoE FFNs (set by the builder)
        if not sys.stdout.isatty():  # TorchTitan's logger writes to stdout
            self.color = NoColor()

    def modality_losses(self) -> dict[str, float]:
        """Pop this rank's per-modality stats, reduce them globally, return the means.

        Every rank of the loss mesh must call this at the same step (it is a collective).
        Modalities with no target tokens anywhere are left out rather than logged as NaN.
        """
        if self.loss_stats is None:
            return {}
        loss_sum, count = self.loss_stats.pop()
        stats = torch.stack([loss_sum.detach().float(), count.detach().float()])
        loss_mesh = self.parallel_dims.get_optional_mesh("loss")
        if loss_mesh is not None:
            stats = funcol.all_reduce(stats, reduceOp="sum", group=loss_mesh)
        return self.loss_stats.means(*stats.cpu())

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        per_modality = self.modality_losses()
        metrics = dict(extra_metrics or {})
        metrics.update({f"loss/{name}": value for name, value in per_modality.items()})
        expert_load = getattr(self.optimizers, "expert_load", None)
        counts = {} if expert_load is None else expert_load.pop(
            self.parallel_dims.get_optional_mesh("loss")
        )
        if self.parallel_dims.pp_enabled and self.has_moe:
            # every stage enters, also one without MoE modules (its counts are empty)
            counts = gather_stage_counts(counts, self.parallel_dims.get_mesh("pp"))
        moe_line = ""
        if counts:
            load, moe_line = expert_load_metrics(counts)
            metrics.update(load)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=metrics)
        if moe_line:
            logger.info(f"{self.color.red}step: {step:2}  {self.color.cyan}{moe_line}{self.color.reset}")
        if self.loss_stats is not None:
            line = "  ".join(
                f"loss/{name}: {per_modality[name]:8.5f}"
                if name in per_modality
                else f"loss/{name}: -"
                for name in self.loss_stats.modalities
            )
            color = self.color
            logger.info(f"{color.red}step: {step:2}  {color.green}{line}{color.reset}")


def build_mot_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: BaseModelArgs | None = None,
    tag: str | None = None,
    loss_stats: ModalityLossStats | None = None,
) -> MoTMetricsProcessor:
    """`TrainSpec.build_metrics_processor_fn` for MoT (the stock builder's signature, plus the
    trainer's `loss_stats`, bound by `MoTTrainer`).

    The trainer builds it right after the model args are final, so it also logs what the
    run unties (see `log_untie_summary`).
    """
    processor = MoTMetricsProcessor(job_config, parallel_dims, tag, loss_stats)
    if isinstance(model_args, MoTModelArgs):
        processor.has_moe = bool(model_args.moe_modalities)
        log_untie_summary(processor, model_args)
    return processor


def log_untie_summary(processor: MetricsProcessor, model_args: MoTModelArgs) -> None:
    """"untied: ffn, norms; params X, active Y" on the console, and the same figures as
    step-0 scalars (`model/params`, `model/active_params`, `model/untied_<component>` = 0/1)
    for TensorBoard / W&B, so runs of different `mot.untie` settings are told apart."""
    total, active = model_args.param_counts()
    untied = [c for c in UNTIE_COMPONENTS if model_args.n_copies(c) > 1]
    logger.info(
        f"untied: {', '.join(untied) or 'none (dense twin)'}; "
        f"params {total:,}, active {active:,}"
    )
    metrics: dict[str, Any] = {"model/params": total, "model/active_params": active}
    metrics.update({f"model/untied_{c}": float(c in untied) for c in UNTIE_COMPONENTS})
    processor.logger.log(metrics, step=0)

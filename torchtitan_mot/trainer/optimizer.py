"""Per-modality optimizer settings: frozen modalities and learning-rate multipliers.

TorchTitan builds the optimizer with `build_optimizers_fn(model_parts, job_config.optimizer,
parallel_dims)`: the `[mot]` section is not passed. `use_modality_optimizer_settings` (called
by `MoTTrainer` before the parent constructor) therefore replaces `job_config.optimizer` by a
`ModalityOptimizerConfig` that carries the modality settings to `build_mot_optimizers`.

Which parameters belong to which modality is read off the module structure, not the names:
the i-th child of a `ModalityLinear` / `ModalityRMSNorm` with several children holds modality
i's weights; one with a single child (a component `mot.untie` leaves shared, or the dense
twin) is shared by all modalities.

Frozen modalities get `requires_grad=False` and stay out of the optimizer. This works with
FSDP2 here (tested bitwise with 2 gloo ranks): FSDP2 shards frozen and trainable parameters of
one group together and reduce-scatters only the gradients that exist, and every rank freezes
the same parameters. Without a gradient a frozen weight is skipped by grad clipping (it does
not shrink the other weights' updates) and by weight decay, and it is never stepped.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import build_optimizers, OptimizersContainer
from torchtitan.config import JobConfig, Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from torchtitan_mot.compat.torchtitan_0_2_2 import (
    optimizer_class_and_kwargs,
    ParamGroupsOptimizersContainer,
    register_moe_load_balancing,
)
from torchtitan_mot.model.moe import MoTMoEFeedForward
from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm
from torchtitan_mot.trainer.metrics import ExpertLoad
from torchtitan_mot.trainer.nonfinite_guard import NonFiniteLossGuard


@dataclass
class ModalityOptimizerConfig(OptimizerConfig):
    """TorchTitan's `[optimizer]` settings plus the `[mot]` per-modality settings."""

    modalities: list[str] = field(default_factory=list)
    frozen_modalities: list[str] = field(default_factory=list)
    lr_multipliers: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [m for m in self.frozen_modalities if m not in self.modalities]
        if unknown:
            raise ValueError(
                f"mot.frozen_modalities {unknown} are not in mot.modalities {self.modalities}"
            )
        if self.lr_multipliers and len(self.lr_multipliers) != len(self.modalities):
            raise ValueError(
                f"mot.lr_multipliers has {len(self.lr_multipliers)} entries but mot.modalities "
                f"has {len(self.modalities)}: {self.modalities}"
            )
        if any(m < 0 for m in self.lr_multipliers):
            raise ValueError(f"mot.lr_multipliers must be >= 0, got {self.lr_multipliers}")

    @property
    def frozen_ids(self) -> set[int]:
        return {self.modalities.index(m) for m in self.frozen_modalities}

    @property
    def multipliers(self) -> list[float]:
        return list(self.lr_multipliers) or [1.0] * len(self.modalities)


def use_modality_optimizer_settings(job_config: JobConfig) -> None:
    """Make `job_config.optimizer` carry the `[mot]` per-modality settings (see module doc)."""
    mot = job_config.mot
    job_config.optimizer = ModalityOptimizerConfig(
        **dataclasses.asdict(job_config.optimizer),
        modalities=list(mot.modalities),
        frozen_modalities=list(mot.frozen_modalities),
        lr_multipliers=list(mot.lr_multipliers),
    )


def modality_parameters(model: nn.Module) -> dict[int, list[nn.Parameter]]:
    """Untied parameters by modality id; parameters not listed are shared by all modalities
    (including every single-child module: freezing it would freeze all modalities).
    An MoE FFN (model/moe.py) says itself which set each of its parameters belongs to."""
    groups: dict[int, list[nn.Parameter]] = {}
    moe_ffns = [m for m in model.modules() if isinstance(m, MoTMoEFeedForward)]
    inside = {id(m) for ffn in moe_ffns for m in ffn.modules()}
    for ffn in moe_ffns:
        if ffn.n_sets > 1:
            for modality, params in ffn.parameters_by_set().items():
                groups.setdefault(modality, []).extend(params)
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, (ModalityLinear, ModalityRMSNorm)) and len(module) > 1:
            for modality, child in enumerate(module):
                groups.setdefault(modality, []).extend(child.parameters())
    return groups


class MoTOptimizersContainer(ParamGroupsOptimizersContainer):
    """`OptimizersContainer` with one parameter group per modality (plus the shared one).

    Group lrs are `lr x multiplier`; TorchTitan's `LambdaLR` scales each group's initial lr,
    so the schedule keeps the ratios. Checkpointing is TorchTitan's flattened optimizer state
    dict, which stores lr and the other hyperparameters per parameter, whatever the grouping.

    `step_guard` (the trainer's non-finite loss guard), when given, is asked before every
    step; if it says no, the step is skipped, leaving weights and optimizer state untouched.
    """

    def __init__(
        self,
        model_parts: list[nn.Module],
        optimizer_cls: type[torch.optim.Optimizer],
        optimizer_kwargs: dict[str, Any],
        frozen_ids: set[int],
        multipliers: list[float],
        step_guard: NonFiniteLossGuard | None = None,
    ) -> None:
        self.step_guard = step_guard
        param_groups_per_part: list[list[dict[str, Any]]] = []
        any_untied = False
        per_modality = bool(frozen_ids) or any(m != 1.0 for m in multipliers)
        for model in model_parts:
            # Without per-modality settings every parameter is in one group (the dense twin
            # has a single weight set whatever the data's modality count).
            by_modality = modality_parameters(model) if per_modality else {}
            # A pipeline stage may hold no blocks; the dense twin holds no untied ones at all.
            if by_modality and len(by_modality) != len(multipliers):
                raise ValueError(
                    f"the model has {len(by_modality)} modality weight sets but mot.modalities "
                    f"lists {len(multipliers)}: per-modality freezing / lr multipliers need an "
                    "MoT flavor with one weight set per modality (not the dense twin)"
                )
            any_untied = any_untied or bool(by_modality)
            untied = {id(p) for params in by_modality.values() for p in params}
            for modality in frozen_ids:
                for p in by_modality.get(modality, []):
                    p.requires_grad_(False)
            shared = [p for p in model.parameters() if id(p) not in untied and p.requires_grad]
            param_groups = [{"params": shared}] if shared else []
            for modality, params in sorted(by_modality.items()):
                trainable = [p for p in params if p.requires_grad]
                if trainable:
                    lr = optimizer_kwargs["lr"] * multipliers[modality]
                    param_groups.append({"params": trainable, "lr": lr})
            param_groups_per_part.append(param_groups)
        if per_modality and not any_untied:
            raise ValueError(
                "mot.frozen_modalities / mot.lr_multipliers are set but the model has no "
                "per-modality weights: they need an MoT flavor (not the dense twin)"
            )
        super().__init__(model_parts, optimizer_cls, optimizer_kwargs, param_groups_per_part)

    def step(self, *args, **kwargs) -> None:
        if self.step_guard is not None and not self.step_guard.should_step():
            return
        super().step(*args, **kwargs)


def build_mot_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
    step_guard: NonFiniteLossGuard | None = None,
) -> OptimizersContainer:
    """TorchTitan's `build_optimizers`, with per-modality groups when the config has them
    and the trainer's non-finite loss guard (`step_guard`, bound by `MoTTrainer`).

    A plain `[optimizer]` config (no `use_modality_optimizer_settings`) or one that asks for
    an optimizer-in-backward / fault-tolerant container gets TorchTitan's own container,
    which has no place for the guard (`MoTTrainer` refuses it).
    A model with MoE FFNs gets TorchTitan's expert-bias load balancing hook on that container
    (`register_moe_load_balancing`), after the hook that records the expert load for the
    metrics (`ExpertLoad`, `optimizers.expert_load`).
    """
    optimizers = _build(model_parts, optimizer_config, parallel_dims, ft_manager, step_guard)
    modalities = getattr(optimizer_config, "modalities", [])
    expert_load = ExpertLoad.of(model_parts, modalities)
    if expert_load is not None:
        # Registered first: it reads the counts before TorchTitan's hook resets them.
        optimizers.register_step_pre_hook(lambda *_args, **_kwargs: expert_load.record())
        optimizers.expert_load = expert_load
        register_moe_load_balancing(optimizers, model_parts, optimizer_config, parallel_dims)
    return optimizers


def _build(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None,
    step_guard: NonFiniteLossGuard | None,
) -> OptimizersContainer:
    if not isinstance(optimizer_config, ModalityOptimizerConfig):
        return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    per_modality = bool(optimizer_config.frozen_modalities) or any(
        m != 1.0 for m in optimizer_config.multipliers
    )
    special = optimizer_config.early_step_in_backward or (ft_manager and ft_manager.enabled)
    if special:
        if per_modality:
            raise NotImplementedError(
                "mot.frozen_modalities / mot.lr_multipliers are not supported with "
                "optimizer.early_step_in_backward or fault tolerance"
            )
        return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    optimizer_cls, optimizer_kwargs = optimizer_class_and_kwargs(optimizer_config)
    return MoTOptimizersContainer(
        model_parts,
        optimizer_cls,
        optimizer_kwargs,
        optimizer_config.frozen_ids,
        optimizer_config.multipliers,
        step_guard,
    )

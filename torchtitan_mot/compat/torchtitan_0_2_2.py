"""Workarounds for TorchTitan 0.2.2 (and the torch it runs on), except the CPU fallback.

The first docstring line of each function or class names the limit it works around.
"""

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torchtitan.train
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch.distributed._composable.replicate import DDP as ReplicatedModule
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import ConfigManager, JobConfig, Optimizer as OptimizerConfig
from torchtitan.config.job_config import Parallelism
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.protocols import train_spec as train_spec_module
from torchtitan.protocols.train_spec import TrainSpec
from torchtitan.tools.logging import logger


def isolate_compile_cache_per_rank() -> None:
    """torch 2.13's AOTAutograd cache key of a DTensor ignores the rank (pytorch#188390).

    Ranks sharing a cache would load graphs traced for another rank's process groups or
    device, so each rank of a multi-process run gets its own subfolder of the inductor cache
    (read from TORCHINDUCTOR_CACHE_DIR, which torch consults lazily); warm restarts keep it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            cache_dir(), f"rank{os.environ['RANK']}"
        )


def run_main(trainer_cls: type[torchtitan.train.Trainer], job_config: JobConfig) -> None:
    """0.2.2's `main()` parses the command line itself, with a plain `ConfigManager()`.

    Runs TorchTitan's own `main` on `job_config`, already loaded (and resolved) by the caller.
    """

    class LoadedConfig(ConfigManager):
        def parse_args(self, args: list[str] | None = None) -> JobConfig:
            return job_config

    torchtitan.train.ConfigManager = LoadedConfig
    torchtitan.train.main(trainer_cls)


class _DropAssetsPathWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("HF assets path ")


@contextmanager
def without_assets_path_warning() -> Iterator[None]:
    """0.2.2's `ConfigManager` warns "HF assets path ... does not exist!" against the working directory.

    The plugin resolves a config's paths against the config's repository and the shipped
    assets afterwards (and names a really missing one itself), so that warning is dropped
    while parsing.
    """
    drop = _DropAssetsPathWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class ModelArgsOnOneLine(logging.Filter):
    """0.2.2's `Trainer.__init__` logs the model args as indented JSON, one line per field (30 for MoT).

    Rewrites that record to one line of compact JSON (without the `_enforced` marker field).
    """

    _DUMP = re.compile(r"Building (\S+) (\S+)with (\{.*\})", re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Building ") and "\n" in record.msg:
            match = self._DUMP.fullmatch(record.msg)
            if match:
                args = json.loads(match[3])
                args.pop("_enforced", None)
                record.msg = f"Building {match[1]} {match[2]} with {json.dumps(args)}"
        return True


def config_file_values(config_manager: ConfigManager, args: list[str]) -> dict[str, Any]:
    """0.2.2's `ConfigManager` reads `--job.config_file` only in its private `_maybe_load_toml`.

    The values of the TOML file named in `args` (empty without one), before any merging.
    """
    return config_manager._maybe_load_toml(args) or {}


@contextmanager
def train_spec_as(adapt: Callable[[TrainSpec], TrainSpec]) -> Iterator[None]:
    """0.2.2's `Trainer.__init__` looks its TrainSpec up by name and calls each builder with a fixed signature.

    Within the context that look-up returns `adapt(registered spec)`: a trainer hands objects
    it owns to the builders by binding them into the spec's builder functions (the one way
    MoTTrainer injects its loss statistics and non-finite guard).
    """
    lookup = train_spec_module.get_train_spec
    train_spec_module.get_train_spec = lambda name: adapt(lookup(name))
    try:
        yield
    finally:
        train_spec_module.get_train_spec = lookup


def optimizer_class_and_kwargs(
    config: OptimizerConfig,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """0.2.2's `build_optimizers` translates `[optimizer]` into a class and kwargs inline, with no function to call.

    The same translation, for a container that needs them with its own parameter groups.
    """
    classes = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if config.name not in classes:
        raise NotImplementedError(f"Optimizer {config.name} not added.")
    assert config.implementation in ("fused", "foreach", "for-loop"), config.implementation
    return classes[config.name], {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "eps": config.eps,
        "weight_decay": config.weight_decay,
        "fused": config.implementation == "fused",
        "foreach": config.implementation == "foreach",
    }


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


@contextmanager
def pipeline_stage_modules(extend: Callable[[list[list[str]]], list[list[str]]]) -> Iterator[None]:
    """0.2.2's `pipeline_llm` splits a model by fixed names (tok_embeddings, layers, norm, output); any other module becomes None on every stage.

    Within the context, the per-stage module names it generates (when
    `parallelism.module_fqns_per_model_part` is unset) pass through `extend`, which adds a
    model's other modules to the stages that run them.
    """
    import torchtitan.distributed.pipeline_parallel as pipeline_parallel

    generate = pipeline_parallel.generate_llm_fqn_per_model_part
    pipeline_parallel.generate_llm_fqn_per_model_part = lambda *a, **k: extend(generate(*a, **k))
    try:
        yield
    finally:
        pipeline_parallel.generate_llm_fqn_per_model_part = generate


def set_pipeline_loss(
    schedule: _PipelineSchedule, loss_fn: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """0.2.2 gives a pipeline schedule its loss once; torch has no setter (private `_loss_fn`).

    Makes the schedule call `loss_fn` on the last stage from its next step on; returns the
    loss it called before.
    """
    previous = schedule._loss_fn
    schedule._loss_fn = loss_fn
    return previous


class GlobalTokenScaledLoss:
    """0.2.2's PP `forward_backward_step` divides by the global token count only after backward ran.

    The gradients are then those of the token SUM, `global_valid_tokens` times too large
    (the grad norm explodes and clipping hides a wrong update). Installed as the schedule's
    loss (`set_pipeline_loss`), this divides the summed loss by the step's global valid-token
    count inside `dividing_by`, so backward runs on the normalised loss; outside it the
    divisor is 1, so validation through the same schedule sees the plain sum.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.divisor: torch.Tensor | float = 1.0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.loss_fn(*args, **kwargs) / self.divisor

    @contextmanager
    def dividing_by(self, global_valid_tokens: torch.Tensor | float) -> Iterator[None]:
        """Divide by `global_valid_tokens` for one pipeline step; the parent's own division of
        the returned losses must then be by 1."""
        self.divisor = global_valid_tokens
        try:
            yield
        finally:
            self.divisor = 1.0


def keep_moe_counts_out_of_pipeline_metadata(
    schedule: _PipelineSchedule, model_parts: list[nn.Module]
) -> None:
    """torch's pipeline schedules run every stage's forward once more, for metadata inference, when they (re)initialise.

    The first stage runs it on a real microbatch, later stages on uninitialised buffers:
    TorchTitan's `MoE` would count those tokens into `tokens_per_expert`, which drives the
    expert-bias update and the logged expert load. The counts of this rank's MoE modules are
    restored after the schedule's (private) `_initialize_pp_stages`, which runs the forward
    and backward metadata inference (a recomputed forward under full AC included).
    """
    from torchtitan.models.moe import MoE

    moes = [m for part in model_parts for m in part.modules() if isinstance(m, MoE)]
    if not moes:
        return
    initialize = schedule._initialize_pp_stages

    def initialize_without_counting(*args: Any, **kwargs: Any) -> Any:
        saved = [m.tokens_per_expert.clone() for m in moes]
        try:
            return initialize(*args, **kwargs)
        finally:
            with torch.no_grad():
                for moe, counts in zip(moes, saved):
                    moe.tokens_per_expert.copy_(counts)

    schedule._initialize_pp_stages = initialize_without_counting


def pipeline_metadata_loss_calls(calls: int, parallelism: Parallelism, local_batch: int) -> int:
    """torch's pipeline schedules call the loss once more, on real data, the first time they run.

    That call (backward metadata inference) is no training microbatch: of the `calls` loss
    calls one pipeline step made, returns how many were such extra calls (the first ones),
    so the per-modality losses of the first step can cover exactly its microbatches.
    """
    microbatches = local_batch // parallelism.pipeline_parallel_microbatch_size
    return max(calls - microbatches, 0)


def _allreduce_sum_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook that sums gradients instead of averaging them."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_gradients_over_replicas(model_parts: list[nn.Module], parallel_dims: ParallelDims) -> None:
    """0.2.2's `apply_ddp` AVERAGES gradients over dp ranks on top of the global-token normalisation.

    That leaves gradients 1/dp too small; a comm hook that SUMS is registered on every
    replicated model part (a no-op without DDP).
    """
    replicated = [m for m in model_parts if isinstance(m, ReplicatedModule)]
    if replicated:
        group = parallel_dims.get_mesh("dp_replicate").get_group()
        for module in replicated:
            module.register_comm_hook(group, _allreduce_sum_hook)


def checkpoint_id_for_step(checkpointer: CheckpointManager, load_step: int) -> str | None:
    """0.2.2's `CheckpointManager` picks its load step in private `_find_load_step`/`_create_checkpoint_id`.

    The checkpoint id of `load_step` in the checkpoint folder (-1: the latest complete
    step), or None when there is none.
    """
    step = checkpointer._find_load_step() if load_step == -1 else load_step
    return None if step == -1 else checkpointer._create_checkpoint_id(step)


class ParamGroupsOptimizersContainer(OptimizersContainer):
    """0.2.2's `OptimizersContainer.__init__` puts each model part's parameters in ONE param group.

    This one takes the param groups of each model part; the rest of the parent's set-up is
    its private `_validate_length` / `_post_init`.
    """

    def __init__(
        self,
        model_parts: list[nn.Module],
        optimizer_cls: type[torch.optim.Optimizer],
        optimizer_kwargs: dict[str, Any],
        param_groups: list[list[dict[str, Any]]],
    ) -> None:
        self.model_parts = model_parts
        self.optimizers = [optimizer_cls(groups, **optimizer_kwargs) for groups in param_groups]
        self._validate_length(len(self.model_parts))
        all_params = [p for groups in param_groups for group in groups for p in group["params"]]
        self._post_init(all_params, optimizer_kwargs)


def fsdp_reshards_after_forward(module: FSDPModule) -> bool:
    """torch's FSDP2 has no public getter for `reshard_after_forward` (private `_get_fsdp_state`).

    Its param group keeps a post-forward mesh only when it reshards after forward.
    """
    group = module._get_fsdp_state()._fsdp_param_group
    return group is None or group.post_forward_mesh_info is not None


def shard_on_host_for_context_parallel(
    ids: torch.Tensor, cp_mesh: DeviceMesh, load_balancer_type: str | None
) -> torch.Tensor | None:
    """0.2.2's `cp_shard` builds its load-balancer index on the device (private `_HeadTailLoadBalancer`).

    Host tensors would otherwise go to the device (and MoT's ids back to the host). Shards
    a host (batch, seq) tensor exactly as `cp_shard` shards the tokens (the same head-tail
    reordering, then this rank's chunk of the sequence), without the device. Returns None
    for the "ptrr" balancer, whose order depends on the device-side BlockMask.
    """
    if load_balancer_type not in (None, "headtail"):
        return None
    world, rank = cp_mesh.size(0), cp_mesh.get_local_rank()
    if load_balancer_type == "headtail":
        index = _HeadTailLoadBalancer(ids.shape[1], world, "cpu")._generate_indices()
        ids = ids.index_select(1, index[0])
    return ids.chunk(world, dim=1)[rank]


_torch_histc = torch.histc


def _histc_integers_on_cpu(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if input.device.type == "cpu" and not input.is_floating_point():
        # Exact for the expert ids counted here (< 2**24); counts in the input's dtype, as
        # CUDA's integer histc returns them.
        return _torch_histc(input.float(), *args, **kwargs).to(input.dtype)
    return _torch_histc(input, *args, **kwargs)


def count_experts_on_cpu() -> None:
    """0.2.2's MoE router/reorderer count expert ids with `torch.histc` on int64; CPU lacks it.

    ("histogram_cpu" not implemented for 'Long'.) `torch.histc` is wrapped so that integer
    CPU inputs are counted as float32 and returned as integers; every other call is passed
    straight through.
    Installed once, on import of torchtitan_mot.
    """
    torch.histc = _histc_integers_on_cpu


class _MoEBlockView(nn.Module):
    """One MoE module dressed as the block 0.2.2's load-balancing hook expects."""

    moe_enabled = True

    def __init__(self, moe: nn.Module, layers: nn.ModuleDict, layer: str) -> None:
        super().__init__()
        self.moe = moe
        object.__setattr__(self, "_layers", layers)  # not a child: the view owns nothing
        self._layer = layer

    @property
    def checkpoint_impl(self) -> Any:
        """The real block's (full AC wraps it): the hook halves the counts of a recomputed block."""
        return getattr(self._layers[self._layer], "checkpoint_impl", None)


def moe_block_views(model_parts: list[nn.Module]) -> list[nn.Module]:
    """Model parts as 0.2.2's hook walks them: `layers` holding one view per `MoE` module."""
    from torchtitan.models.moe import MoE

    views = []
    for part in model_parts:
        layers = part.get_submodule("layers")
        view = nn.Module()
        view.layers = nn.ModuleDict({
            f"{name}_{i}": _MoEBlockView(moe, layers, name)
            for name, block in layers.items()
            for i, moe in enumerate(m for m in block.modules() if isinstance(m, MoE))
        })
        views.append(view)
    return views


def register_moe_load_balancing(
    optimizers: OptimizersContainer,
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
) -> None:
    """0.2.2's expert-bias hook is private to `build_optimizers_with_moe_load_balancing`, which
    builds its own container and reads one `block.moe` per block of `model.layers`.

    Runs that builder with `build_optimizers` answering `optimizers` (ours) and on views of
    the model parts with one pseudo-block per `MoE` module (`moe_block_views`), so TorchTitan's
    own hook (all-reduce of the counts over the loss mesh, sign update of the expert bias,
    counts reset) is registered on our container for every MoE module.
    """
    from unittest import mock

    import torchtitan.components.optimizer as tt_optimizer

    with mock.patch.object(tt_optimizer, "build_optimizers", lambda **_: optimizers):
        built = tt_optimizer.build_optimizers_with_moe_load_balancing(
            moe_block_views(model_parts), optimizer_config, parallel_dims
        )
    assert built is optimizers

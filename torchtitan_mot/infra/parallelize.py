"""Apply TorchTitan's parallelisms to an MoT model."""

import torch.nn as nn
from torchtitan.config import JobConfig, TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_fsdp,
)
from torchtitan.tools.logging import logger

from torchtitan_mot.model.args import MoTModelArgs


def validate_parallelism(model_args: MoTModelArgs, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Fail at start-up, naming the setting, for shardings that cannot work."""
    p = job_config.parallelism
    tp, cp, pp = parallel_dims.tp, parallel_dims.cp, parallel_dims.pp
    n_kv = model_args.n_kv_heads or model_args.n_heads
    if model_args.n_heads % tp or n_kv % tp:
        raise ValueError(
            f"parallelism.tensor_parallel_degree={p.tensor_parallel_degree} must divide "
            f"n_heads={model_args.n_heads} and n_kv_heads={n_kv}"
        )
    seq_len = job_config.training.seq_len
    if seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len={seq_len} must be divisible by tensor_parallel_degree "
            f"({tp}) x 2 x context_parallel_degree ({cp}) = {parallel_dims.seq_len_divisor}"
        )
    if pp > model_args.n_layers:
        raise ValueError(
            f"parallelism.pipeline_parallel_degree={pp} exceeds n_layers={model_args.n_layers}"
        )


def parallelize_mot(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Activation checkpointing, per-block torch.compile and FSDP2/HSDP, in TorchTitan's order."""
    validate_parallelism(model.model_args, parallel_dims, job_config)
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled:
        raise NotImplementedError("tensor/context parallel for MoT is not available yet")

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError(
            "pure DDP (data_parallel_replicate_degree > 1 without sharding) is refused: "
            "TorchTitan 0.2.2's apply_ddp leaves gradients 1/dp too small. Use "
            "data_parallel_shard_degree (FSDP) or HSDP (replicate x shard) instead."
        )
    return model

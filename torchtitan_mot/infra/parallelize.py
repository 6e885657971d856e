"""Apply TorchTitan's parallelisms to an MoT model.

Order as in TorchTitan's Llama3: tensor (+ sequence, + loss) parallel, context parallel,
activation checkpointing, per-block compile, FSDP2/HSDP.
"""

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    parallelize_module,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)
from torchtitan.config import JobConfig, TORCH_DTYPE_MAP
from torchtitan.config.job_config import Compile as CompileConfig
from torchtitan.distributed import NoParallel, ParallelDims
from torchtitan.distributed.context_parallel import apply_cp_to_attention_module
from torchtitan.models.llama3.infra.parallelize import apply_compile, apply_ddp, apply_fsdp
from torchtitan.tools.logging import logger

from torchtitan_mot.model.args import MoTModelArgs
from torchtitan_mot.model.model import MoTBlock, MoTTransformer
from torchtitan_mot.model.moe import MoTMoEFeedForward
from torchtitan_mot.model.routing import ModalityLinear

from .activation_checkpoint import apply_mot_ac
from .expert_parallel import (
    apply_expert_parallel,
    moe_tensor_parallel_plan,
    shard_experts,
    validate_moe_parallelism,
)
from .sequence_parallel import (
    ModalityLinearParallel,
    ModalityNormParallel,
    SortedStreamParallel,
    SortedSublayerParallel,
)

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
    lengths = {"training.seq_len": job_config.training.seq_len}
    if job_config.validation.enable:
        lengths["validation.seq_len"] = job_config.validation.seq_len
    for name, seq_len in lengths.items():
        if seq_len % parallel_dims.seq_len_divisor:
            raise ValueError(
                f"{name}={seq_len} must be divisible by tensor_parallel_degree "
                f"({tp}) x 2 x context_parallel_degree ({cp}) = {parallel_dims.seq_len_divisor}"
            )
    # Sequence parallel shards the flat batch*seq token axis over TP; with seq_len % tp == 0
    # every (micro)batch of whole sequences splits evenly, so no separate check is needed.
    if pp > model_args.n_layers:
        raise ValueError(
            f"parallelism.pipeline_parallel_degree={pp} exceeds n_layers={model_args.n_layers}"
        )
    if tp > 1 and p.enable_async_tensor_parallel:
        raise ValueError(
            "parallelism.enable_async_tensor_parallel is not supported for MoT: its "
            "micro-pipelining pattern-matches Linear matmuls, MoT uses routed per-modality matmuls"
        )
    if cp > 1 and model_args.attn_type == "varlen":
        raise ValueError(
            f"parallelism.context_parallel_degree={cp} needs attn_type sdpa or flex; "
            "TorchTitan 0.2.2 has no context parallel for varlen attention"
        )


def validate_converters(model: MoTTransformer, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Refuse model converters that would do nothing, or cannot run, on an MoT model.

    Converters run before `parallelize_fn`, so the model already shows what they did.
    """
    converters = job_config.model.converters
    grouped = [c for c in converters if c.startswith("quantize.grouped_mm")]
    if grouped:
        raise ValueError(
            f"model.converters {grouped}: grouped-GEMM quantization targets MoE expert "
            "weights; MoT has no grouped experts (its per-modality projections are converted "
            "by quantize.linear.float8 / quantize.linear.mx)"
        )
    converted = sorted(
        {type(m[0]).__name__ for m in model.modules() if isinstance(m, ModalityLinear) and m.converted}
    )
    if not converted:
        if any(c.startswith("quantize.linear") for c in converters):
            raise ValueError(
                f"model.converters {list(converters)} converted no per-modality projection "
                "(check quantize.linear.*.filter_fqns and that dims are multiples of 16)"
            )
        return
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if compile_model:
        raise ValueError(
            f"model.converters {list(converters)} with compile.enable (components 'model'): "
            f"MoT runs each converted projection ({', '.join(converted)}) on its modality's "
            "slice, whose size is data; torchao's float8 ops cannot be traced over such "
            "sizes with fullgraph=True. Train float8 in eager mode, or compile without it."
        )
    if parallel_dims.tp_enabled:
        raise ValueError(
            f"model.converters {list(converters)} with tensor_parallel_degree="
            f"{parallel_dims.tp}: converted per-modality projections ({', '.join(converted)}) "
            "are not tensor-parallel sharded by MoT yet; use FSDP/HSDP with float8"
        )


def apply_tp(
    model: MoTTransformer, tp_mesh: DeviceMesh, loss_parallel: bool, expert_parallel: bool = False
) -> None:
    """Megatron tensor + sequence parallel on the modality-sorted stream.

    Per modality m: wq/wk/wv/w1/w3.m colwise (Shard(0): this rank's heads / hidden units),
    wo/w2.m rowwise (Shard(1)); norm weights replicated. Between sublayers the sorted
    (T, dim) stream is sharded along T (see `infra/sequence_parallel.py`). The embedding is
    vocab-sharded with a replicated output (the sort needs every token), the final norm
    runs on the sorted chunk, and the output head is colwise with vocab-sharded logits
    (`Shard(-1)`) for loss parallel. An FFN with MoE weight sets shards its dense sets the
    same way and each `MoE` by `moe_tensor_parallel_plan` (`expert_parallel`: the experts are
    split over the TP ranks by expert parallel instead).
    """
    top: dict[str, ParallelStyle] = {"": SortedStreamParallel()}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        )
    if model.norm is not None:
        top["norm"] = SequenceParallel(sequence_dim=0, use_local_output=True)
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)
    if model.diffusion:
        # Transfusion's patch and timestep layers see full (replicated) activations on every
        # rank: replicated compute, with DTensor weights so clipping sees one mesh. (A
        # pipeline stage holds only its part of them.)
        parallelize_module(model.diffusion, tp_mesh, {name: NoParallel() for name in model.diffusion})

    block_plan: dict[str, ParallelStyle] = {
        "attention_norm": ModalityNormParallel(sequence_sharded=True),
        "ffn_norm": ModalityNormParallel(sequence_sharded=True),
        "attention.w[qkv]": ModalityLinearParallel(Shard(0)),
        "attention.wo": ModalityLinearParallel(Shard(1)),
        "attention": SortedSublayerParallel(),
        "feed_forward": SortedSublayerParallel(),
    }
    if model.model_args.qk_norm:  # on all tokens, this rank's heads
        block_plan["attention.[qk]_norm"] = ModalityNormParallel(sequence_sharded=False)
    for block in model.layers.values():
        assert isinstance(block, MoTBlock), type(block)
        ffn, dense = block.feed_forward, "feed_forward"
        ffn_plan: dict[str, ParallelStyle] = {}
        if isinstance(ffn, MoTMoEFeedForward):
            dense = "feed_forward.dense" if ffn.dense is not None else ""
            for s, moe in ffn.moe.items():
                plan = moe_tensor_parallel_plan(moe, expert_parallel)
                ffn_plan |= {f"feed_forward.moe.{s}.{k}": style for k, style in plan.items()}
        if dense:
            ffn_plan |= {
                f"{dense}.w[13]": ModalityLinearParallel(Shard(0)),
                f"{dense}.w2": ModalityLinearParallel(Shard(1)),
            }
        parallelize_module(block, tp_mesh, block_plan | ffn_plan)
        # (routed experts under expert parallel are split over the ep mesh next)
        unsharded = [
            n for n, p in block.named_parameters()
            if not isinstance(p, DTensor) and not (expert_parallel and ".experts." in n)
        ]
        assert not unsharded, f"parameters left out of the TP plan: {unsharded}"
    logger.info(
        "Applied tensor + sequence parallel%s to the model",
        " + loss parallel" if loss_parallel else "",
    )


def apply_mot_compile(model: MoTTransformer, compile_config: CompileConfig) -> None:
    """Per-block `torch.compile` with fullgraph=True: Llama3's `apply_compile` for a model
    without MoE FFNs. A block with MoE FFNs is compiled as TorchTitan's Llama4 compiles its
    MoE blocks: each sublayer on its own, and in the FFN the dense part and every `MoE`'s
    router, reorderer and shared experts, but not its routed experts. Those read per-expert
    token counts on the host (the for-loop path used off Hopper, the expert-parallel split
    sizes) and carry their own FSDP hooks, so they run eager between compiled graphs."""
    if not any(isinstance(m, MoTMoEFeedForward) for m in model.modules()):
        apply_compile(model, compile_config)
        return

    def compiled(module: nn.Module) -> nn.Module:
        return torch.compile(module, backend=compile_config.backend, fullgraph=True)

    for wrapper in model.layers.values():
        block = wrapper._checkpoint_wrapped_module if isinstance(wrapper, CheckpointWrapper) else wrapper
        for name, sublayer in list(block.named_children()):
            if not isinstance(sublayer, MoTMoEFeedForward):
                setattr(block, name, compiled(sublayer))
                continue
            if sublayer.dense is not None:
                sublayer.dense = compiled(sublayer.dense)
            for moe in sublayer.moe.values():
                for part, child in list(moe.named_children()):
                    if part != "experts":
                        setattr(moe, part, compiled(child))
    logger.info("Compiling each MoT block's sublayers (routed experts eager) with torch.compile")


def apply_mot_fsdp(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """FSDP2/HSDP of a model with Llama3's layout (`tok_embeddings`, `layers`, `norm`,
    `output`): TorchTitan's `apply_fsdp`, after the routed experts of the MoE modules got
    their own units where they need one (`shard_experts`).
    Gradients are summed, not averaged (0.2.2 divides the loss by the global token count),
    which is also right for the experts, whose tokens come from every EP rank.

    Expert parallel without data-parallel sharding (EP borrowing only TP ranks) leaves the
    model unsharded but still gives the experts their units (their gradients are reduced
    over `efsdp`), without mixed precision, as TorchTitan trains a TP-only model."""
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    training, policy = job_config.training, job_config.parallelism.fsdp_reshard_after_forward
    param_dtype = TORCH_DTYPE_MAP[training.mixed_precision_param]
    reduce_dtype = TORCH_DTYPE_MAP[training.mixed_precision_reduce]
    reshard = policy == "always" or (policy == "default" and not parallel_dims.pp_enabled)
    if not parallel_dims.fsdp_enabled:
        shard_experts(model, parallel_dims, MixedPrecisionPolicy(), reshard)
        return
    shard_experts(model, parallel_dims, MixedPrecisionPolicy(param_dtype, reduce_dtype), reshard)
    apply_fsdp(
        model,
        parallel_dims.get_mesh(names),
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        pp_enabled=parallel_dims.pp_enabled,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=policy,
    )
    logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")


def parallelize_mot(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """TP/SP, CP, activation checkpointing, per-block compile, FSDP2/HSDP (TorchTitan's order)."""
    assert isinstance(model, MoTTransformer), type(model)
    validate_parallelism(model.model_args, parallel_dims, job_config)
    validate_converters(model, parallel_dims, job_config)
    validate_moe_parallelism(model, parallel_dims, job_config)

    if parallel_dims.tp_enabled:
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            expert_parallel=parallel_dims.ep_enabled,
        )
    if parallel_dims.ep_enabled:
        apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
    if parallel_dims.cp_enabled:
        apply_cp_to_attention_module(
            [block.attention.inner_attention for block in model.layers.values()],
            parallel_dims.get_mesh("cp"),
            model.model_args.attn_type,
        )

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_mot_ac(model, job_config, compile_model)
    if compile_model:
        apply_mot_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled or parallel_dims.ep_enabled:
        apply_mot_fsdp(model, parallel_dims, job_config)
    elif parallel_dims.dp_replicate_enabled:
        mesh = parallel_dims.get_mesh("dp_replicate")
        if parallel_dims.world_size != mesh.size():
            raise ValueError(
                "data_parallel_replicate_degree without data_parallel_shard_degree (DDP) "
                "cannot be combined with tensor/pipeline/context parallel; use HSDP"
            )
        # MoTTrainer fixes 0.2.2's DDP gradient scale (a summing comm hook).
        apply_ddp(model, mesh, enable_compile=compile_model)
    return model

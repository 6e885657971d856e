"""The memory model: per-GPU memory of an MoT training job, estimated without GPUs.

The model is built on the meta device under a fake process group (one simulated rank per
pipeline stage: the first rank of each stage) and the REAL `parallelize_mot` (and
TorchTitan's pipeline split for pp > 1) is applied, so the shard sizes and FSDP reshard
policy are the ones a run gets. Memory is then estimated per stage from those shards (see
`ASSUMPTIONS`); the largest stage is the one that has to fit. The command line is
`python -m torchtitan_mot.check_plan`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torchtitan.config import JobConfig, TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims

from torchtitan_mot import build_model_args
from torchtitan_mot.config import ConfigError, resolve_job_config
from torchtitan_mot.data.tokenizer import VocabLayout
from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.compat.torchtitan_0_2_2 import fsdp_reshards_after_forward
from torchtitan_mot.infra.parallelize import parallelize_mot
from torchtitan_mot.infra.pipeline import pipeline_mot
from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.model.args import MoTModelArgs
from torchtitan_mot.model.moe import MoTMoEFeedForward

LLAMA3_TEXT_VOCAB = 128_256
"""Text vocabulary of the Llama3 tokenizer, used when the config's tokenizer is not local."""
GIB = 1024**3
USABLE = 0.9
"""Fraction of a GPU's memory the plan may use (the rest: allocator fragmentation, NCCL,
CUDA context, compile workspaces)."""
MEGATRON_BLOCK = 34
"""Bytes per token per hidden unit a transformer block keeps for backward without AC (bf16,
flash attention, sequence parallel; Korthikanti et al. 2022), divided by tp."""

ASSUMPTIONS = """\
assumptions:
- model state: fp32 master params + fp32 grads (FSDP2 keeps sharded grads in the param dtype)
  + AdamW exp_avg, exp_avg_sq = 16 B per LOCAL parameter. MoE FFNs: num_experts x 3 x dim x
  hidden routed-expert weights per MoE modality and layer, sharded ep x efsdp ways.
- FSDP working set (read from the applied FSDP modules): every unit that does not reshard
  after forward stays all-gathered from its forward to the end of the step with its
  unsharded grads (param dtype + reduce dtype bytes per TP/EP-local param; an
  expert-parallel rank gathers only its own experts, over the efsdp mesh). Under PP,
  TorchTitan's default policy does not reshard blocks after forward, so EVERY block of a
  stage is unsharded; otherwise two blocks at a time (current + prefetched), plus the
  norm/output unit, which the default policy never reshards after forward.
- activations (bf16, flash attention, sequence parallel), s = tokens per micro-batch per rank
  (micro-batch (PP) or local batch, times seq_len / cp), h = dim, per layer:
  none 34*s*h/tp (Megatron); full 2*s*h/tp (the block input);
  selective op 2*s*(h + wq_out + wv_out + h + ffn_hidden + h)/tp (block input, wq, wv,
  attention and w1, w2 outputs: MoT saves every other per-modality matmul like Llama3);
  selective N: every Nth layer of a stage full, the others none.
  Plus one block recomputed at a time (34*s*h/tp) when any layer is checkpointed, and fp32
  logits x2 for the loss on the output stage (/tp under loss parallel). A PP stage holds up
  to min(pp, micro-batches) micro-batches in flight (1F1B; the first stage's worst case)."""


@dataclass
class StagePlan:
    """One simulated rank's shard and memory estimate."""

    stage: int
    rank: int
    layers: int
    params: int
    sharding: str
    unsharded_blocks: int
    state_gib: float
    fsdp_gib: float
    act_gib: float

    @property
    def total_gib(self) -> float:
        return self.state_gib + self.fsdp_gib + self.act_gib


@dataclass
class Plan:
    """A config's layout, the GPUs it is planned for, and every stage's estimate."""

    source: str
    job: JobConfig
    ngpu: int
    dp_shard: int
    gpu_gib: float
    vocab: VocabLayout
    vocab_source: str
    stages: list[StagePlan]

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_gib)

    @property
    def fits(self) -> bool:
        return self.worst.total_gib <= USABLE * self.gpu_gib


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _numel(module: nn.Module) -> int:
    return sum(_local_numel(p) for p in module.parameters())


FSDP_MESH_DIMS = ("fsdp", "efsdp")
"""Mesh dimensions FSDP2 shards over: TorchTitan's "fsdp" (dp_shard x cp) and, for the
routed experts under expert parallel, "efsdp" (what is left of it after ep)."""


def unsharded_numel(module: nn.Module) -> int:
    """Parameters of `module` as FSDP all-gathers them: the global size divided by the
    non-FSDP shards (tensor- and expert-parallel shards stay local: an expert-parallel rank
    gathers only its own experts). FSDP's padding of uneven shards is not counted."""
    total = 0
    for p in module.parameters():
        n = p.numel()  # a DTensor's global size
        if hasattr(p, "device_mesh"):
            for name, size, placement in zip(p.device_mesh.mesh_dim_names or (), p.device_mesh.shape,
                                             p.placements):
                if name not in FSDP_MESH_DIMS and isinstance(placement, (Shard, _StridedShard)):
                    n //= size
        total += n
    return total


def placements_in_words(param: torch.Tensor) -> str:
    """A parameter's DTensor placements as a user reads them: `sharded 8 ways on dim 0
    over dp_shard_cp` rather than `_StridedShard(dim=0, sf=8)` (the strided variant is how
    FSDP shards a TP shard; for memory it is an ordinary shard, and torch 2.13 does not
    derive it from `Shard`)."""
    if not hasattr(param, "placements"):
        return "not sharded"
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or tuple(f"mesh dim {i}" for i in range(mesh.ndim))
    words = []
    for name, size, placement in zip(names, mesh.shape, param.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            words.append(f"sharded {size} ways on dim {placement.dim} over {name}")
        elif isinstance(placement, Replicate):
            words.append(f"replicated over {name}")
        else:
            words.append(f"partial sums over {name}")
    return ", ".join(words)


def vocab_layout(job: JobConfig) -> tuple[VocabLayout, str]:
    """The unified vocabulary: the config's tokenizer if it is local, else Llama3's text ids."""
    path = job.model.hf_assets_path
    layout = resolve_job_config(job)  # load_job_config resolved it: the attached vocabulary
    if path and Path(path).is_dir():
        return layout, f"tokenizer at {path}"
    where = f"{path} not local" if path else "no tokenizer given"
    return layout, f"Llama3 text vocab {LLAMA3_TEXT_VOCAB:,} ({where})"


def activation_bytes(
    args: MoTModelArgs, job: JobConfig, layers: int, wq_out: int, wv_out: int, ffn_hidden: int,
    has_output: bool, vocab_size: int,
) -> float:
    """Activation bytes one rank of a stage with `layers` blocks keeps at its peak."""
    p, ac = job.parallelism, job.activation_checkpoint
    tp, cp, pp = p.tensor_parallel_degree, p.context_parallel_degree, p.pipeline_parallel_degree
    local_batch = job.training.local_batch_size
    seqs = p.pipeline_parallel_microbatch_size if pp > 1 else local_batch
    s, h = seqs * job.training.seq_len // cp, args.dim
    in_flight = min(pp, local_batch // p.pipeline_parallel_microbatch_size) if pp > 1 else 1
    block_none = MEGATRON_BLOCK * s * h / tp
    block_full = 2 * s * h / tp
    if ac.mode == "none":
        kept, checkpointed = layers * block_none, 0
    elif ac.mode == "full":
        kept, checkpointed = layers * block_full, layers
    elif ac.mode == "selective" and ac.selective_ac_option == "op":
        kept = layers * 2 * s * (h + wq_out + wv_out + h + ffn_hidden + h) / tp
        checkpointed = layers
    elif ac.mode == "selective" and ac.selective_ac_option.isdigit():
        # TorchTitan checkpoints blocks whose 1-based count on the rank is a multiple of N
        # (0: all of them); each rank builds only its own stage, so the count starts there.
        every = int(ac.selective_ac_option)
        checkpointed = layers if every == 0 else layers // every
        kept = checkpointed * block_full + (layers - checkpointed) * block_none
    else:
        raise ValueError(
            f"activation_checkpoint.mode={ac.mode!r} (selective_ac_option="
            f"{ac.selective_ac_option!r}) is not modelled by check_plan: use none, full, or "
            "selective with 'op' or a layer count"
        )
    act = in_flight * kept + (block_none if checkpointed else 0)
    if has_output:
        loss_parallel = tp > 1 and not p.disable_loss_parallel
        act += 2 * 4 * s * vocab_size / (tp if loss_parallel else 1)
    return act


def parallel_dims(job: JobConfig, ngpu: int) -> ParallelDims:
    """The config's degrees on `ngpu` GPUs (resolves dp_shard = -1, checks the product and
    that expert parallel divides the ranks it borrows, which torch would report only as a
    mesh-unflatten error)."""
    p = job.parallelism
    dims = ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree, world_size=ngpu,
    )
    borrowed = dims.dp_shard * dims.cp * (dims.tp if dims.etp == 1 else 1)
    if dims.ep > 1 and borrowed % dims.ep:
        raise ConfigError(
            f"parallelism.expert_parallel_degree={dims.ep} does not divide the {borrowed} ranks it is "
            f"taken from (data_parallel_shard_degree {dims.dp_shard} x context_parallel_degree {dims.cp}"
            f"{f' x tensor_parallel_degree {dims.tp}' if dims.etp == 1 and dims.tp > 1 else ''}) on {ngpu} GPUs"
        )
    return dims


def _ffn_hidden(ffn: nn.Module) -> int:
    """Hidden width of a block's FFN: its dense SwiGLU's, or one expert's (model/moe.py;
    experts have the dense hidden size)."""
    if isinstance(ffn, MoTMoEFeedForward):
        if ffn.dense is None:
            return next(iter(ffn.moe.values())).experts.w1.shape[1]
        ffn = ffn.dense
    return ffn.w1[0].weight.shape[0]


def plan_stage(job: JobConfig, ngpu: int, args: MoTModelArgs, stage: int) -> StagePlan:
    """Simulate the first rank of pipeline stage `stage` and estimate its memory."""
    pp = job.parallelism.pipeline_parallel_degree
    rank = stage * (ngpu // pp)  # pp is the outermost mesh dimension
    if dist.is_initialized():
        raise RuntimeError("check_plan simulates ranks under its own fake process group; "
                           "a process group is already initialized in this process")
    dist.init_process_group("fake", rank=rank, world_size=ngpu)
    try:
        pd = parallel_dims(job, ngpu)
        pd.build_mesh()
        with torch.device("meta"):
            model = MoTTransformer(args)
        if pp > 1:
            _, parts, _, _ = pipeline_mot(model, pd, job, torch.device("cpu"), args,
                                          parallelize_mot, lambda pred, labels: pred.sum())
        else:
            parts = [parallelize_mot(model, pd, job)]
        blocks = [b for m in parts for b in m.layers.values()]
        attn, ffn = blocks[0].attention, blocks[0].feed_forward
        wq = attn.wq[0].weight
        local_wq = wq.to_local() if hasattr(wq, "to_local") else wq
        sharding = f"{placements_in_words(wq)}, local {tuple(local_wq.shape)}"
        params = sum(_numel(m) for m in parts)
        # FSDP units kept all-gathered (with unsharded grads) through the step, gathered
        # over their FSDP mesh ("fsdp"; "efsdp" for experts under EP): TP/EP-local sizes.
        units = [u for m in parts for u in m.modules() if isinstance(u, FSDPModule) and u not in parts]
        kept = [u for u in units if not fsdp_reshards_after_forward(u)]
        kept_blocks = [b for b in blocks if b in kept]
        unsharded_blocks = (len(kept_blocks) or min(2, len(blocks))) if units else 0
        block_numel = max(unsharded_numel(b) for b in blocks)
        other_numel = sum(unsharded_numel(u) for u in kept
                          if not any(u is b or u in list(b.modules()) for b in blocks))
        act = activation_bytes(
            args, job, len(blocks), attn.wq[0].weight.shape[0], attn.wv[0].weight.shape[0],
            _ffn_hidden(ffn), any(m.output is not None for m in parts), args.vocab_size,
        )
    finally:
        dist.destroy_process_group()
    working_bytes = (TORCH_DTYPE_MAP[job.training.mixed_precision_param].itemsize
                     + TORCH_DTYPE_MAP[job.training.mixed_precision_reduce].itemsize)
    fsdp_bytes = working_bytes * (unsharded_blocks * block_numel + other_numel)
    return StagePlan(stage, rank, len(blocks), params, sharding, unsharded_blocks,
                     16 * params / GIB, fsdp_bytes / GIB, act / GIB)


def build_plan(source: str, job: JobConfig, ngpu: int, gpu_gib: float) -> Plan:
    """The plan of `job` on `ngpu` GPUs of `gpu_gib` GiB, one simulated rank per stage
    (`source` names the config in errors and the report)."""
    vocab, vocab_source = vocab_layout(job)
    try:  # the trainer's own checks of the flavor against [mot] (modalities, untie)
        args = build_model_args(job, vocab)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    enable_cpu_fallback()  # meshes on "cpu" when no accelerator; a no-op otherwise
    dims = parallel_dims(job, ngpu)
    stages = [plan_stage(job, ngpu, args, s) for s in range(dims.pp)]
    return Plan(source, job, ngpu, dims.dp_shard, gpu_gib, vocab, vocab_source, stages)

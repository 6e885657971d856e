"""Per-GPU memory plan of an MoT training config, checked without GPUs.

    python scripts/check_plan.py --config train_configs/mot_8B_3modality.toml
    python scripts/check_plan.py --flavor 70B_3modality --ngpu 256 --tp 8 --pp 4

The job config is parsed by TorchTitan's own `ConfigManager` (as the trainer does), the model
is built on the meta device under a fake process group (one simulated rank per pipeline
stage: the first rank of each stage) and the REAL `parallelize_mot` (and TorchTitan's
pipeline split for pp > 1) is applied, so the shard sizes and FSDP reshard policy are the
ones a run gets. Memory is then estimated per stage from those shards (see `ASSUMPTIONS`);
the largest stage is the one that has to fit. The GPU count and memory a shipped config is
planned for come from its `# check_plan: --ngpu N --gpu-gib G  (note)` comment line.
"""

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import ConfigManager, JobConfig, TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.pipeline_parallel import pipeline_llm

from torchtitan_mot import build_model_args, mot_args
from torchtitan_mot.data.tokenizer import build_mot_tokenizer, VocabLayout
from torchtitan_mot.compat.cpu import enable_cpu_fallback
from torchtitan_mot.compat.torchtitan_0_2_2 import fsdp_reshards_after_forward
from torchtitan_mot.infra.parallelize import parallelize_mot
from torchtitan_mot.model import MoTTransformer
from torchtitan_mot.model.args import MoTModelArgs

LLAMA3_TEXT_VOCAB = 128_256
"""Text vocabulary of the Llama3 tokenizer, used when the config's tokenizer is not local."""
GIB = 1024**3
USABLE = 0.9
"""Fraction of a GPU's memory the plan may use (the rest: allocator fragmentation, NCCL,
CUDA context, compile workspaces)."""
MEGATRON_BLOCK = 34
"""Bytes per token per hidden unit a transformer block keeps for backward without AC (bf16,
flash attention, sequence parallel; Korthikanti et al. 2022), divided by tp."""
COMMENT = re.compile(r"^#\s*check_plan:(.*)$", re.M)

ASSUMPTIONS = """\
assumptions:
- model state: fp32 master params + fp32 grads (FSDP2 keeps sharded grads in the param dtype)
  + AdamW exp_avg, exp_avg_sq = 16 B per LOCAL parameter.
- FSDP working set (read from the applied FSDP modules): every unit that does not reshard
  after forward stays all-gathered from its forward to the end of the step with its
  unsharded grads (param dtype + reduce dtype bytes per TP-local param). Under PP,
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


def vocab_layout(job: JobConfig) -> tuple[VocabLayout, str]:
    """The unified vocabulary: the config's tokenizer if it is local, else Llama3's text ids."""
    path = job.model.hf_assets_path
    if path and Path(path).is_dir():
        return build_mot_tokenizer(job).layout, f"tokenizer at {path}"
    layout = VocabLayout(LLAMA3_TEXT_VOCAB, tuple(job.mot.modalities), tuple(job.mot.codebook_sizes))
    return layout, f"Llama3 text vocab {LLAMA3_TEXT_VOCAB:,} ({path or 'no tokenizer'} not local)"


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
    """The config's degrees on `ngpu` GPUs (resolves dp_shard = -1, checks the product)."""
    p = job.parallelism
    return ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree, world_size=ngpu,
    )


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
            _, parts, _, _ = pipeline_llm(model, pd, job, torch.device("cpu"), args,
                                          parallelize_mot, lambda pred, labels: pred.sum())
        else:
            parts = [parallelize_mot(model, pd, job)]
        blocks = [b for m in parts for b in m.layers.values()]
        attn, ffn = blocks[0].attention, blocks[0].feed_forward
        wq = attn.wq[0].weight
        local_wq = wq.to_local() if hasattr(wq, "to_local") else wq
        sharding = f"wq.0 {tuple(getattr(wq, 'placements', ()))} local {tuple(local_wq.shape)}"
        params = sum(_numel(m) for m in parts)
        # FSDP units kept all-gathered (with unsharded grads) through the step; block_numel
        # is FSDP-sharded over dp_shard x cp (TorchTitan's "fsdp" mesh), x fsdp is TP-local.
        fsdp = pd.dp_shard * pd.cp
        units = [u for m in parts for u in m.modules() if isinstance(u, FSDPModule) and u not in parts]
        kept = [u for u in units if not fsdp_reshards_after_forward(u)]
        kept_blocks = [b for b in blocks if b in kept]
        unsharded_blocks = (len(kept_blocks) or min(2, len(blocks))) if units else 0
        block_numel = max(_numel(b) for b in blocks) * fsdp
        other_numel = sum(_numel(u) for u in kept if u not in blocks) * fsdp
        act = activation_bytes(
            args, job, len(blocks), attn.wq[0].weight.shape[0], attn.wv[0].weight.shape[0],
            ffn.w1[0].weight.shape[0], any(m.output is not None for m in parts), args.vocab_size,
        )
    finally:
        dist.destroy_process_group()
    working_bytes = (TORCH_DTYPE_MAP[job.training.mixed_precision_param].itemsize
                     + TORCH_DTYPE_MAP[job.training.mixed_precision_reduce].itemsize)
    fsdp_bytes = working_bytes * (unsharded_blocks * block_numel + other_numel)
    return StagePlan(stage, rank, len(blocks), params, sharding, unsharded_blocks,
                     16 * params / GIB, fsdp_bytes / GIB, act / GIB)


def _planned_for(path: str) -> argparse.Namespace:
    """`--ngpu` and `--gpu-gib` from the config's `# check_plan:` comment line."""
    found = COMMENT.findall(Path(path).read_text())
    if len(found) != 1:
        raise ValueError(
            f"{path}: expected one '# check_plan: --ngpu N --gpu-gib G  (note)' comment line "
            f"naming the GPUs this config is planned for, found {len(found)}"
        )
    p = argparse.ArgumentParser(prog=f"{path}: # check_plan:", add_help=False)
    p.add_argument("--ngpu", type=int, required=True)
    p.add_argument("--gpu-gib", type=float, required=True)
    return p.parse_args(shlex.split(found[0].split("(", 1)[0]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a training TOML; the flags below then override it")
    p.add_argument("--flavor", choices=sorted(mot_args), help="model.flavor (required without --config)")
    p.add_argument("--ngpu", type=int, help="GPUs (required without --config)")
    p.add_argument("--gpu-gib", type=float, help="memory of one GPU (default 80 without --config)")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--cp", type=int)
    p.add_argument("--dp-replicate", type=int)
    p.add_argument("--dp-shard", type=int, help="-1: whatever is left")
    p.add_argument("--seq-len", type=int, help="default 8192 without --config")
    p.add_argument("--local-batch-size", type=int, help="sequences per data-parallel rank per step "
                   "(default without --config: 1, or 2*pp with PP)")
    p.add_argument("--microbatch-size", type=int)
    p.add_argument("--ac", choices=["full", "selective", "none"], help="default full without --config")
    p.add_argument("--selective-ac-option", help="'op' or N (every Nth layer)")
    p.add_argument("--codebook-sizes", type=int, nargs="+",
                   help="mot.codebook_sizes, one per non-text modality (default without --config: 8192 each)")
    return p


_TITAN_FLAGS = {
    "flavor": "--model.flavor", "tp": "--parallelism.tensor_parallel_degree",
    "pp": "--parallelism.pipeline_parallel_degree", "cp": "--parallelism.context_parallel_degree",
    "dp_replicate": "--parallelism.data_parallel_replicate_degree",
    "dp_shard": "--parallelism.data_parallel_shard_degree", "seq_len": "--training.seq_len",
    "local_batch_size": "--training.local_batch_size",
    "microbatch_size": "--parallelism.pipeline_parallel_microbatch_size",
    "ac": "--activation_checkpoint.mode",
    "selective_ac_option": "--activation_checkpoint.selective_ac_option",
}


def load_plan_inputs(argv: list[str]) -> tuple[str, JobConfig, int, float]:
    """Parse check_plan's arguments into (source, job config, ngpu, gpu_gib) via ConfigManager."""
    a = _parser().parse_args(argv)
    titan = ["--job.custom_config_module", "torchtitan_mot.config"]
    if a.config:
        source = a.config
        planned = _planned_for(a.config)
        a.ngpu = a.ngpu or planned.ngpu
        a.gpu_gib = a.gpu_gib or planned.gpu_gib
        titan += ["--job.config_file", a.config]
    else:
        if a.flavor is None or a.ngpu is None:
            raise SystemExit("check_plan: --flavor and --ngpu are required without --config")
        source = "command line"
        pp = a.pp or 1
        a.gpu_gib = a.gpu_gib or 80.0
        a.seq_len = a.seq_len or 8192
        a.local_batch_size = a.local_batch_size or (2 * pp if pp > 1 else 1)
        a.ac = a.ac or "full"
        n_mod = max(2, mot_args[a.flavor].n_modalities)  # the dense twin still reads image tokens
        modalities = ["text", "image", "speech"][:n_mod]
        a.codebook_sizes = a.codebook_sizes or [8192] * (n_mod - 1)
        titan += ["--model.hf_assets_path", "", "--training.mixed_precision_param", "bfloat16",
                  "--mot.modalities", ",".join(modalities)]
    if a.codebook_sizes:
        titan += ["--mot.codebook_sizes", *map(str, a.codebook_sizes)]
    for name, flag in _TITAN_FLAGS.items():
        if getattr(a, name) is not None:
            titan += [flag, str(getattr(a, name))]
    return source, ConfigManager().parse_args(titan), a.ngpu, a.gpu_gib


def check_plan(argv: list[str]) -> Plan:
    """Build the plan of a config (or of command-line flags) on meta, one rank per stage."""
    source, job, ngpu, gpu_gib = load_plan_inputs(argv)
    vocab, vocab_source = vocab_layout(job)
    try:  # the trainer's own checks of the flavor against [mot] (modalities, untie)
        args = build_model_args(job, vocab)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    enable_cpu_fallback()  # meshes on "cpu" when no accelerator; a no-op otherwise
    dims = parallel_dims(job, ngpu)
    stages = [plan_stage(job, ngpu, args, s) for s in range(dims.pp)]
    return Plan(source, job, ngpu, dims.dp_shard, gpu_gib, vocab, vocab_source, stages)


def format_plan(plan: Plan) -> str:
    """The plan as printed: layout header, assumptions, one row per stage, the verdict."""
    job, p = plan.job, plan.job.parallelism
    ac = job.activation_checkpoint
    ac_text = f"{ac.mode} ({ac.selective_ac_option})" if ac.mode == "selective" else ac.mode
    lines = [
        f"{plan.source}: {job.model.flavor} on {plan.ngpu} GPUs of {plan.gpu_gib:g} GiB = dp_replicate "
        f"{p.data_parallel_replicate_degree} x dp_shard {plan.dp_shard} x cp "
        f"{p.context_parallel_degree} x tp {p.tensor_parallel_degree} x pp {p.pipeline_parallel_degree}; "
        f"seq_len {job.training.seq_len}, local batch {job.training.local_batch_size}, micro-batch "
        f"{p.pipeline_parallel_microbatch_size}, AC {ac_text}, FSDP reshard policy "
        f"{p.fsdp_reshard_after_forward}; vocab {plan.vocab.vocab_size:,} = {plan.vocab_source} + "
        f"codebooks {list(plan.vocab.codebook_sizes)} + 2 markers each",
        ASSUMPTIONS,
        f"{'stage':>5} {'rank':>5} {'layers':>6} {'params/rank':>12} {'state GiB':>9} {'unsharded':>9} "
        f"{'FSDP GiB':>8} {'act GiB':>8} {'total GiB':>9}  sharding",
    ]
    for r in plan.stages:
        lines.append(
            f"{r.stage:>5} {r.rank:>5} {r.layers:>6} {r.params / 1e9:>11.3f}B {r.state_gib:>9.1f} "
            f"{r.unsharded_blocks:>9} {r.fsdp_gib:>8.1f} {r.act_gib:>8.1f} {r.total_gib:>9.1f}  {r.sharding}"
        )
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"sum over stages of one rank's shard: {sum(r.params for r in plan.stages) / 1e9:.3f}B params; "
        f"largest rank {plan.worst.total_gib:.1f} GiB -> {verdict} in {plan.gpu_gib:g} GiB "
        f"({USABLE:.0%} usable = {USABLE * plan.gpu_gib:.1f} GiB)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the plan; exit 1 when the largest rank does not fit."""
    plan = check_plan(sys.argv[1:] if argv is None else argv)
    print(format_plan(plan))
    if not plan.fits:
        raise SystemExit(1)

"""Check an MoT sharding plan and estimate per-GPU memory, without GPUs.

    python scripts/check_plan.py --flavor 70B_3modality --ngpu 256 --tp 8 --pp 4

Builds the model on the meta device under a fake process group (one simulated rank per
pipeline stage: the first rank of each stage), applies the REAL `parallelize_mot` (and
TorchTitan's pipeline split for --pp > 1), and prints, per stage, the rank's parameter
count and a memory estimate. The largest stage is the one that has to fit.

Assumptions (printed with the table):
- vocabulary: 128,256 Llama3 text ids + one 8,192-entry codebook and 2 markers (begin/end)
  per non-text modality (image, speech), as in the unified vocabulary.
- model state: fp32 master parameters (4 B) + fp32 gradients (4 B; FSDP2 keeps sharded
  grads in the parameter dtype) + AdamW exp_avg and exp_avg_sq (8 B) = 16 B per LOCAL
  parameter.
- FSDP working set: the bf16 all-gathered parameters (2 B) and fp32 unsharded gradients
  (4 B) of two blocks at a time (current + prefetched), after TP sharding.
- activations (bf16, flash attention, sequence parallel; Megatron's estimate, Korthikanti et
  al. 2022): 34*s*h/tp bytes per layer per micro-batch sequence without AC; with full AC only
  each block's input (2*s*h/tp) is kept, plus one block recomputed at a time. A pipeline
  stage holds up to pp micro-batches in flight (1F1B). Logits: fp32, s*vocab/tp, x2 for the
  loss. s = seq_len / cp tokens per sequence, times the micro-batch size (PP) or the local
  batch size (no PP).
"""

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402  registers "fake"

from torchtitan_mot.infra.cpu import enable_cpu_fallback  # noqa: E402

enable_cpu_fallback()  # meshes on "cpu" when no accelerator; a no-op otherwise

from torchtitan.config import JobConfig  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.distributed.pipeline_parallel import pipeline_llm  # noqa: E402

from torchtitan_mot import mot_args  # noqa: E402
from torchtitan_mot.infra.parallelize import parallelize_mot  # noqa: E402
from torchtitan_mot.model import MoTTransformer  # noqa: E402
from torchtitan_mot.model.routing import ModalityLinear  # noqa: E402

TEXT_VOCAB, CODEBOOK, MARKERS = 128256, 8192, 2
GIB = 1024**3


def unified_vocab(n_modalities: int) -> int:
    return TEXT_VOCAB + (n_modalities - 1) * (CODEBOOK + MARKERS)


@dataclass
class StageReport:
    stage: int
    rank: int
    layers: int
    params: int
    block_params: int
    has_output: bool
    sharding: str
    state_gib: float = 0.0
    fsdp_gib: float = 0.0
    act_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return self.state_gib + self.fsdp_gib + self.act_gib


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _job_config(a: argparse.Namespace) -> JobConfig:
    jc = JobConfig()
    jc.training.seq_len = a.seq_len
    jc.training.local_batch_size = a.local_batch_size
    jc.training.mixed_precision_param = "bfloat16"
    jc.parallelism.data_parallel_replicate_degree = a.dp_replicate
    jc.parallelism.data_parallel_shard_degree = a.dp_shard
    jc.parallelism.tensor_parallel_degree = a.tp
    jc.parallelism.pipeline_parallel_degree = a.pp
    jc.parallelism.context_parallel_degree = a.cp
    jc.parallelism.pipeline_parallel_microbatch_size = a.microbatch_size
    jc.activation_checkpoint.mode = a.ac
    return jc


def check_stage(a: argparse.Namespace, stage: int) -> StageReport:
    """Simulate the first rank of pipeline stage `stage` and report its shard."""
    world = a.ngpu
    rank = stage * (world // a.pp)  # pp is the outermost mesh dimension
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        pd = ParallelDims(dp_replicate=a.dp_replicate, dp_shard=a.dp_shard, cp=a.cp, tp=a.tp,
                          pp=a.pp, ep=1, etp=1, world_size=world)
        pd.build_mesh()
        jc = _job_config(a)
        args = copy.deepcopy(mot_args[a.flavor])
        args.vocab_size = unified_vocab(args.n_modalities)
        args.max_seq_len = a.seq_len
        with torch.device("meta"):
            model = MoTTransformer(args)
        if a.pp > 1:
            _, parts, _, _ = pipeline_llm(model, pd, jc, torch.device("cpu"), args,
                                          parallelize_mot, lambda pred, labels: pred.sum())
        else:
            parts = [parallelize_mot(model, pd, jc)]
        blocks = [b for m in parts for b in m.layers.values()]
        params = sum(_local_numel(p) for m in parts for p in m.parameters())
        block_params = max(sum(_local_numel(p) for p in b.parameters()) for b in blocks)
        wq = next(m for m in blocks[0].modules() if isinstance(m, ModalityLinear))[0].weight
        report = StageReport(stage, rank, len(blocks), params, block_params,
                             any(m.output is not None for m in parts),
                             f"wq.0 {tuple(wq.placements)} local {tuple(wq.to_local().shape)}")
    finally:
        dist.destroy_process_group()

    # block_params is FSDP-sharded (over dp_shard x cp, TorchTitan's "fsdp" mesh); its
    # all-gathered, TP-local size is block_params * fsdp
    fsdp = pd.dp_shard * pd.cp
    report.state_gib = 16 * params / GIB
    report.fsdp_gib = (2 * block_params * fsdp * (2 + 4) / GIB) if fsdp > 1 else 0.0
    # tokens per forward: a micro-batch under PP, the whole local batch otherwise
    seqs = a.microbatch_size if a.pp > 1 else a.local_batch_size
    s = seqs * a.seq_len // a.cp
    h, vocab = args.dim, args.vocab_size
    in_flight = min(a.pp, a.local_batch_size // a.microbatch_size) if a.pp > 1 else 1
    full_layer = 34 * s * h / a.tp
    if a.ac == "full":
        act = in_flight * report.layers * 2 * s * h / a.tp + full_layer
    else:
        act = in_flight * report.layers * full_layer
    if report.has_output:
        act += 2 * 4 * s * vocab / a.tp
    report.act_gib = act / GIB
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", required=True, choices=sorted(mot_args))
    p.add_argument("--ngpu", type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--dp-shard", type=int, default=-1, help="-1: whatever is left")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--local-batch-size", type=int, default=None,
                   help="sequences per data-parallel rank per step (default: 1, or 2*pp with PP)")
    p.add_argument("--microbatch-size", type=int, default=1)
    p.add_argument("--ac", choices=["full", "selective", "none"], default="full")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, for the verdict")
    a = p.parse_args()
    if a.local_batch_size is None:
        a.local_batch_size = 2 * a.pp if a.pp > 1 else 1
    os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "OFF")

    reports = [check_stage(a, s) for s in range(a.pp)]
    total = sum(r.params for r in reports)
    print(f"{a.flavor}: {a.ngpu} GPUs = dp_replicate {a.dp_replicate} x dp_shard "
          f"{a.ngpu // (a.dp_replicate * a.tp * a.pp * a.cp)} x cp {a.cp} x tp {a.tp} x pp {a.pp}; "
          f"seq_len {a.seq_len}, local batch {a.local_batch_size}, micro-batch {a.microbatch_size}, "
          f"AC {a.ac}; vocab {unified_vocab(mot_args[a.flavor].n_modalities):,}")
    print(f"{'stage':>5} {'rank':>5} {'layers':>6} {'params/rank':>12} {'state GiB':>9} "
          f"{'FSDP GiB':>8} {'act GiB':>8} {'total GiB':>9}  sharding")
    for r in reports:
        print(f"{r.stage:>5} {r.rank:>5} {r.layers:>6} {r.params / 1e9:>11.3f}B {r.state_gib:>9.1f} "
              f"{r.fsdp_gib:>8.1f} {r.act_gib:>8.1f} {r.total_gib:>9.1f}  {r.sharding}")
    worst = max(reports, key=lambda r: r.total_gib)
    verdict = "fits" if worst.total_gib <= a.gpu_gib * 0.9 else "does NOT fit"
    print(f"sum over stages of one rank's shard: {total / 1e9:.3f}B params; "
          f"largest rank {worst.total_gib:.1f} GiB -> {verdict} in {a.gpu_gib:.0f} GiB (90% usable)")


if __name__ == "__main__":
    main()

"""A small model that embeds TorchTitan `MoE` modules as MoT does, and the expert-parallel /
FSDP workers of its parity tests (importable as `harness.moe`, so spawned ranks find them).

Like MoT's MoE FFN, each block holds its MoE modules in a ModuleDict keyed by modality and
calls every one of them on every forward with that modality's contiguous slice of the
modality-sorted stream, shape (1, n, dim), n possibly 0. The infra code finds the MoE
modules by walking the model, so it handles this model and MoT's alike.
"""

import torch
import torch.nn as nn
from torchtitan.models.moe import MoE, MoEArgs

DIM, VOCAB, N_EXPERTS = 16, 32, 4


def moe_args(num_experts: int = N_EXPERTS) -> MoEArgs:
    """Top-2 (top-1 of a single expert), one shared expert, the CPU (for-loop) expert path."""
    return MoEArgs(num_experts=num_experts, num_shared_experts=1, top_k=min(2, num_experts),
                   score_func="softmax", use_grouped_mm=False, load_balance_coeff=1e-3)


class TinyMoEBlock(nn.Module):
    """Modality 0: a dense Linear; modality 1: a TorchTitan MoE (called even on no tokens)."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(DIM, DIM, bias=False)
        self.moe = nn.ModuleDict({"1": MoE(args, dim=DIM, hidden_dim=2 * DIM)})

    def forward(self, x: torch.Tensor, n0: int) -> torch.Tensor:
        moe_out = self.moe["1"](x[n0:].unsqueeze(0)).squeeze(0)
        return x + torch.cat([self.dense(x[:n0]), moe_out])


class TinyMoEModel(nn.Module):
    """Llama3's layout (`tok_embeddings`, `layers`, `norm`, `output`) around `TinyMoEBlock`s;
    `forward(tokens, n0)`: tokens (S,) already sorted, the first `n0` of modality 0."""

    def __init__(self, n_layers: int = 2, num_experts: int = N_EXPERTS) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): TinyMoEBlock(moe_args(num_experts)) for i in range(n_layers)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def init_weights(self) -> None:
        with torch.no_grad():
            for block in self.layers.values():
                for moe in block.moe.values():
                    moe.init_weights(0.1, buffer_device=torch.device("cpu"))

    def forward(self, tokens: torch.Tensor, n0: int) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, n0)
        return self.output(self.norm(h))


Batch = tuple[torch.Tensor, int, torch.Tensor]


def rank_batches(world_size: int, seed: int = 0) -> list[list[Batch]]:
    """Per rank two (tokens, n0, labels) micro-batches of 12 tokens: in the first every rank
    holds MoE (modality-1) tokens, in the second the last rank holds none."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world_size):
        n0s = [3 + 2 * r, 12 if r == world_size - 1 else 5 + r]
        out.append([(torch.randint(0, VOCAB, (12,), generator=g), n0,
                     torch.randint(0, VOCAB, (12,), generator=g)) for n0 in n0s])
    return out


def build(seed: int = 0, num_experts: int = N_EXPERTS) -> TinyMoEModel:
    torch.manual_seed(seed)
    model = TinyMoEModel(num_experts=num_experts)
    model.init_weights()
    return model


def loss_fn(model: nn.Module, tokens: torch.Tensor, n0: int, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE (0.2.2 divides by the global token count; sums add up across ranks)."""
    return nn.functional.cross_entropy(model(tokens, n0), labels, reduction="sum")


def reference(world_size: int, num_experts: int = N_EXPERTS) -> dict:
    """One process: every rank's batches through one unsharded model, losses summed."""
    from torchtitan_mot.compat.torchtitan_0_2_2 import count_experts_on_cpu

    count_experts_on_cpu()
    model = build(num_experts=num_experts)
    losses = [sum(loss_fn(model, *b) for b in batches) for batches in rank_batches(world_size)]
    sum(losses).backward()
    return {"losses": [l.item() for l in losses],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def parallel_worker(rank: int, world_size: int, ep: int, ac_mode: str = "none",
                    param_dtype: str = "float32", num_experts: int = N_EXPERTS) -> dict:
    """FSDP over `world_size` ranks (and expert parallel `ep`) applied by MoT's infra, blocks
    checkpointed by TorchTitan's `apply_ac` with MoT's save list (`ac_mode` "full" or
    "selective" = op-selective), FSDP2 mixed precision `param_dtype`; the loss of this
    rank's batch and the full (gathered) gradients."""
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims

    from torchtitan_mot.compat.cpu import enable_cpu_fallback
    from torchtitan_mot.compat.torchtitan_0_2_2 import count_experts_on_cpu
    from torchtitan_mot.infra.expert_parallel import apply_expert_parallel, validate_moe_parallelism
    from torchtitan_mot.infra.parallelize import apply_mot_fsdp

    enable_cpu_fallback()
    count_experts_on_cpu()
    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=ep, etp=1,
                        world_size=world_size)
    dims.build_mesh()
    job = JobConfig()
    job.training.mixed_precision_param = param_dtype
    job.training.mixed_precision_reduce = "float32"
    job.parallelism.expert_parallel_degree = ep
    job.activation_checkpoint.mode = ac_mode
    job.activation_checkpoint.selective_ac_option = "op"
    model = build(num_experts=num_experts)
    validate_moe_parallelism(model, dims, job)
    if ep > 1:
        apply_expert_parallel(model, dims.get_mesh("ep"))
    if ac_mode != "none":
        from torchtitan.distributed.activation_checkpoint import apply_ac

        from torchtitan_mot.infra.activation_checkpoint import OP_SAC_SAVE_LIST

        apply_ac(model, job.activation_checkpoint, model_compile_enabled=False,
                 op_sac_save_list=OP_SAC_SAVE_LIST, base_folder="")
    apply_mot_fsdp(model, dims, job)
    loss = sum(loss_fn(model, *b) for b in rank_batches(world_size)[rank])
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        n = n.replace("._checkpoint_wrapped_module", "")  # AC's wrapper, not a weight name
        grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    placements = {n.replace("._checkpoint_wrapped_module", ""): str(p.placements)
                  for n, p in model.named_parameters() if "experts.w1" in n and "shared" not in n}
    return {"loss": loss.item(), "grads": grads, "placements": placements}

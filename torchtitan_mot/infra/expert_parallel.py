"""Expert, tensor and data-parallel sharding of the TorchTitan `MoE` modules of a model.

The MoE modules are found by walking the model (`moe_modules`), not by a block attribute:
an MoT block holds one `MoE` per MoE modality, each called on that modality's contiguous
slice of the sorted stream. TorchTitan's own pieces are applied to each: `ExpertParallel`
(experts sharded on the expert axis over the "ep" mesh, tokens exchanged by two
all-to-alls in forward and two in backward) and FSDP2 of the routed experts over the
"efsdp" mesh (`dp_replicate` x `efsdp` under HSDP), as `models/llama4/infra/parallelize.py`
does; the router and shared experts stay in their block's FSDP unit.

Every expert-parallel rank must enter the all-to-alls of every MoE module on every forward,
also with zero tokens of that modality (under sequence or data parallel a rank's slice may
hold none): the model calls each `MoE` with a (1, 0, dim) slice then. gloo implements
`all_to_all_single` with uneven and zero splits, so this runs on CPU as it does on NCCL.

Under tensor + sequence parallel the FFN sublayer gets the all-gathered sorted stream and
reduce-scatters its output (`SortedSublayerParallel`), so every part of an MoE must give a
partial output and a partial input gradient (`moe_tensor_parallel_plan`).
"""

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module, ParallelStyle
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.expert_parallel import (
    ExpertParallel,
    ReordererSequenceParallel,
    TensorParallel,
)
from torchtitan.models.moe import MoE
from torchtitan.tools.logging import logger

from .sequence_parallel import LinearParallel


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every TorchTitan `MoE` of the model, by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def validate_moe_parallelism(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Refuse, naming the setting, what the MoE modules cannot run under."""
    p = job_config.parallelism
    moes = moe_modules(model)
    ep = parallel_dims.ep
    if not moes:
        if ep > 1:
            raise ValueError(
                f"parallelism.expert_parallel_degree={ep} but the model has no MoE FFN "
                "(mot.moe_modalities is empty)"
            )
        return
    for name, moe in moes.items():
        n = moe.experts.num_experts
        if n % ep:
            raise ValueError(
                f"mot.moe_num_experts={n} (at {name}) is not divisible by "
                f"parallelism.expert_parallel_degree={ep}"
            )
    refused = {
        "parallelism.expert_tensor_parallel_degree": (
            p.expert_tensor_parallel_degree,
            "not implemented in MoT: with tensor parallel the experts are either TP-sharded "
            "(no expert parallel) or split by expert parallel over the TP ranks (etp 1)",
        ),
        "parallelism.context_parallel_degree": (
            parallel_dims.cp, "not tested with MoE FFNs (no parity test)",
        ),
    }
    for setting, (degree, why) in refused.items():
        if degree > 1:
            raise ValueError(f"{setting}={degree} with MoE FFNs (mot.moe_modalities): {why}")
    if p.expert_parallel_comm_backend != "standard":
        raise ValueError(
            f"parallelism.expert_parallel_comm_backend={p.expert_parallel_comm_backend!r}: "
            "MoT applies TorchTitan's standard all-to-all ExpertParallel only"
        )
    if job_config.training.enable_cpu_offload:
        raise ValueError(
            "training.enable_cpu_offload with MoE FFNs (mot.moe_modalities): the experts' own "
            "FSDP units (expert parallel, or more FSDP ranks than experts) are not offloaded"
        )
    ac = job_config.activation_checkpoint
    if ep > 1 and ac.mode == "selective" and ac.selective_ac_option == "op":
        raise ValueError(
            "activation_checkpoint.mode='selective' with activation_checkpoint."
            f"selective_ac_option='op' and parallelism.expert_parallel_degree={ep}: op-selective recompute of the "
            "expert-parallel dispatch fails in 0.2.2 (record_function ops mismatch between "
            "forward and recompute); use activation_checkpoint.mode 'full' or a layer "
            "selective_ac_option"
        )


class ExpertTensorParallel(TensorParallel):
    """TorchTitan's expert tensor parallel (w1/w3 column-, w2 row-sharded on the hidden dim)
    without its input hook, which all-reduces the routed input's gradient: on the sorted
    stream it must stay the partial sum that the sublayer's all-gather reduce-scatters."""

    def _prepare_input_fn(self, mod: nn.Module, inputs: Any, device_mesh: DeviceMesh) -> Any:
        return inputs


class ReordererTokenShare(ReordererSequenceParallel):
    """TorchTitan's `ReordererSequenceParallel` (expert parallel borrowing the TP ranks:
    each TP rank routes a contiguous share of the replicated tokens) for any token count: a
    modality's slice of the sorted stream is rarely divisible by the TP degree and may be
    smaller than it, so a rank may route no token (and still enters the all-to-alls)."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0  # this rank's first token in the current call

    @staticmethod
    def share(n_tokens: int, mesh: DeviceMesh) -> tuple[int, int]:
        """[start, end) of this rank's tokens: the first n % size ranks take one more."""
        base, extra = divmod(n_tokens, mesh.size())
        rank = mesh.get_local_rank()
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def _prepare_inputput_fn(
        self, mod: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], device_mesh: DeviceMesh
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top_scores, selected_experts_indices = inputs
        self._start, end = self.share(top_scores.shape[0], device_mesh)
        return top_scores[self._start:end], selected_experts_indices[self._start:end]

    def _prepare_output_fn(
        self, mod: nn.Module, outputs: tuple[torch.Tensor, ...], device_mesh: DeviceMesh
    ) -> tuple[torch.Tensor, ...]:
        # The MoE gathers and scatters by indices into all (tokens x top_k) routes.
        top_scores, token_indices_experts_sorted, num_tokens_per_expert = outputs
        return top_scores, token_indices_experts_sorted + self._start * mod.top_k, num_tokens_per_expert


def moe_tensor_parallel_plan(moe: MoE, expert_parallel: bool) -> dict[str, ParallelStyle]:
    """Tensor-parallel styles of one `MoE` (keys relative to it) on the sequence-parallel
    sorted stream, whose sublayer hook hands it the replicated slice and reduce-scatters its
    output: the router gate computes on every rank (replicated weight, partial gradient: the
    scores' gradient comes from this rank's part of the experts), the shared experts are
    column/row-sharded, and the routed experts either tensor-parallel on the hidden dim or,
    under expert parallel (which borrows the TP ranks), fed a share of the tokens per rank."""
    plan: dict[str, ParallelStyle] = {"router.gate": LinearParallel(Replicate())}
    if moe.shared_experts is not None:
        plan |= {
            "shared_experts.w1": LinearParallel(Shard(0)),
            "shared_experts.w3": LinearParallel(Shard(0)),
            "shared_experts.w2": LinearParallel(Shard(1)),
        }
    if expert_parallel:
        plan["reorderer"] = ReordererTokenShare()
    else:
        plan["experts"] = ExpertTensorParallel()
    return plan


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """TorchTitan's `ExpertParallel` on the routed experts of every MoE module."""
    for moe in moe_modules(model).values():
        parallelize_module(moe.experts, ep_mesh, ExpertParallel())
    logger.info("Applied expert parallel (degree %d) to the MoE experts", ep_mesh.size())


def shard_experts(
    model: nn.Module,
    parallel_dims: ParallelDims,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool,
) -> None:
    """FSDP2 units of the routed experts, applied before the block-level `fully_shard` (so
    the block unit keeps the router and shared experts).

    Under EP: every `experts` module is its own unit on the expert data-parallel mesh, as
    TorchTitan does. Without EP the experts stay in their block's unit (sharded on dim 0,
    the expert axis), unless the FSDP degree exceeds the expert count: FSDP2 pads dim 0 to
    one row per rank, so 4 experts over 64 ranks would keep a whole expert on each rank.
    Then, and under EP when efsdp x ep exceeds the expert count (TorchTitan's rule), the
    experts are sharded on dim 1.
    """
    ep = parallel_dims.ep
    if parallel_dims.ep_enabled:
        shard_dim = "efsdp"
    else:
        shard_dim = "fsdp"
    names = ["dp_replicate", shard_dim] if parallel_dims.dp_replicate_enabled else [shard_dim]
    mesh = parallel_dims.get_mesh(names)
    shards = parallel_dims.get_mesh(shard_dim).size()
    for moe in moe_modules(model).values():
        by_dim1 = shards * ep > moe.experts.num_experts
        if not (parallel_dims.ep_enabled or by_dim1):
            continue
        fully_shard(
            moe.experts,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=(lambda _param: Shard(1)) if by_dim1 else None,
        )

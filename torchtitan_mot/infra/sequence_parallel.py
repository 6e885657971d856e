"""Tensor + sequence parallelism over the modality-SORTED (T, dim) residual stream.

Megatron-style SP shards activations along the token axis between the tensor-parallel
sublayers. MoT keeps its residual stream flat and sorted by modality, so the shard is a
contiguous chunk of the SORTED tokens: rank r holds sorted tokens [r*T/tp, (r+1)*T/tp).
Norms are per token, so they run on that chunk (with the chunk's modality ids). Before the
column-parallel projections the chunks are all-gathered; after the row-parallel ones the
partial sums are reduce-scattered back to chunks.

The model code knows nothing of this: `apply_tp` installs the ParallelStyles below (as
TorchTitan's MoE installs `ReordererSequenceParallel` on its token reorderer). Hooks do the
collectives around the attention / feed-forward sublayers; the per-modality Linears, norms
and the model itself get tensor-parallel subclasses (a class swap, as FSDP2's `fully_shard`
does: parameters, names and hooks stay) that read DTensor weights as local tensors and
shard / gather the sorted stream where it starts and ends.

Every transition is a DTensor redistribute on the 1-D tensor-parallel mesh, so the backward
collective always matches the forward (all-gather <-> reduce-scatter, slice <-> all-gather)
and the blocks still compile with `fullgraph=True`.
"""

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    distribute_module,
    distribute_tensor,
    DTensor,
    Partial,
    Replicate,
    Shard,
)
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from torchtitan_mot.model.model import MoTTransformer
from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm, Routing


def shard_tokens(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Full (T, ...) tensor, identical on every rank -> this rank's chunk of tokens.

    Backward all-gathers, so upstream (e.g. the embedding) sees the full, replicated grad.
    """
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(
        placements=[Shard(0)]
    ).to_local()


def gather_tokens(x: torch.Tensor, mesh: DeviceMesh, grad_is_partial: bool) -> torch.Tensor:
    """This rank's chunk of tokens -> all T tokens (all-gather along dim 0).

    `grad_is_partial`: the consumers are column-parallel (each rank sees a slice of the
    output features), so the incoming gradient is a partial sum and backward reduce-scatters.
    Otherwise the gradient is already full on every rank and backward just slices it.
    """
    full = DTensor.from_local(x, mesh, [Shard(0)], run_check=False).redistribute(
        placements=[Replicate()]
    )
    return full.to_local(grad_placements=[Partial()] if grad_is_partial else [Replicate()])


def reduce_scatter_tokens(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Partial sums of all T tokens (row-parallel output) -> this rank's reduced chunk."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(
        placements=[Shard(0)]
    ).to_local()


def local_tokens(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's chunk of a (T, ...) tensor that needs no gradient (e.g. modality ids)."""
    return x.view(mesh.size(), -1, *x.shape[1:])[mesh.get_local_rank()]


def _swap_class(module: nn.Module, tp_class: type[nn.Module]) -> None:
    """Make `module` an instance of its tensor-parallel subclass `tp_class`."""
    if type(module) not in tp_class.__bases__:
        raise TypeError(f"{tp_class.__name__} applies to {tp_class.__bases__}, got {type(module)}")
    module.__class__ = tp_class


class _ShardedModalityLinear(ModalityLinear):
    """A ModalityLinear whose weights are sharded DTensors: the routed matmul gets this
    rank's shards (backward gives the shards' gradients, sharded the same way)."""

    def modality_weight(self, modality: int) -> torch.Tensor:
        weight = super().modality_weight(modality)
        assert isinstance(weight, DTensor), type(weight)
        return weight.to_local()


class ModalityLinearParallel(ParallelStyle):
    """Shard every modality's weight of a ModalityLinear by `placement`: Shard(0) is
    column-wise (this rank's heads / hidden units), Shard(1) row-wise (output partial sums).

    The module's input and output stay plain local tensors: the hooks of
    `SortedSublayerParallel` on the enclosing sublayer move tokens between ranks.
    """

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.placement = placement

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(
                pname, nn.Parameter(distribute_tensor(param, mesh, [self.placement]))
            )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition)
        _swap_class(module, _ShardedModalityLinear)
        return module


class _LocalLinear(nn.Linear):
    """An nn.Linear (no bias) whose weight is a DTensor that the matmul reads as this rank's
    local tensor: a shard, or a replica applied to this rank's share of the work (the local
    gradient is then a partial sum, marked `Partial`, as for the replicated norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        assert isinstance(weight, DTensor), type(weight)
        grads = [Partial() if p.is_replicate() else p for p in weight.placements]
        return F.linear(x, weight.to_local(grad_placements=grads))


class LinearParallel(ParallelStyle):
    """An nn.Linear of the sorted-stream sublayers, as `ModalityLinearParallel` does it for
    the per-modality ones: Shard(0) column-wise, Shard(1) row-wise, Replicate for replicated
    compute (e.g. a router gate). Input and output stay plain local tensors."""

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.placement = placement

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        module.register_parameter(
            "weight", nn.Parameter(distribute_tensor(module.weight, mesh, [self.placement]))
        )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if getattr(module, "bias", None) is not None:
            raise ValueError(f"{type(self).__name__} takes Linears without bias")
        distribute_module(module, device_mesh, self._partition)
        _swap_class(module, _LocalLinear)
        return module


class _ReplicatedModalityRMSNorm(ModalityRMSNorm):
    """A ModalityRMSNorm with weights replicated over the tensor-parallel mesh.

    Each rank applies them to its share of the tokens (sequence parallel) or heads only, so
    the local weight gradient is a partial sum: marked `Partial`, FSDP2 / the optimizer
    reduce it over the mesh.
    """

    def modality_weight(self, modality: int) -> torch.Tensor:
        weight = super().modality_weight(modality)
        assert isinstance(weight, DTensor), type(weight)
        return weight.to_local(grad_placements=[Partial()] * len(weight.placements))


class ModalityNormParallel(ParallelStyle):
    """Replicate a ModalityRMSNorm's weights. `sequence_sharded`: the norm sits on the
    sequence-parallel stream, so its input is this rank's chunk of the sorted tokens and
    its modality ids (the second argument) are cut to the same chunk."""

    def __init__(self, sequence_sharded: bool) -> None:
        super().__init__()
        self.sequence_sharded = sequence_sharded

    @staticmethod
    def _local_ids(
        module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh
    ) -> tuple[Any, ...]:
        x, sorted_ids, *rest = inputs
        return (x, local_tokens(sorted_ids, mesh), *rest)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        input_fn = self._local_ids if self.sequence_sharded else None
        distribute_module(module, device_mesh, input_fn=input_fn)  # replicates
        _swap_class(module, _ReplicatedModalityRMSNorm)
        return module


class SortedSublayerParallel(ParallelStyle):
    """Attention or feed-forward between two sequence-parallel norms: all-gather the
    sorted tokens (first argument) for the column-parallel projections, reduce-scatter the
    row-parallel output's partial sums back to this rank's chunk."""

    @staticmethod
    def _gather_input(
        module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh
    ) -> tuple[Any, ...]:
        x, *rest = inputs
        return (gather_tokens(x, mesh, grad_is_partial=True), *rest)

    @staticmethod
    def _scatter_output(
        module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor, mesh: DeviceMesh
    ) -> torch.Tensor:
        return reduce_scatter_tokens(output, mesh)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(partial(self._gather_input, mesh=device_mesh))
        module.register_forward_hook(partial(self._scatter_output, mesh=device_mesh))
        return module


class _SequenceParallelMoTTransformer(MoTTransformer):
    """MoTTransformer whose blocks see this rank's chunk of the sorted stream."""

    sequence_parallel_mesh: DeviceMesh

    def sort_stream(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        mesh = self.sequence_parallel_mesh
        if h.shape[0] % mesh.size():
            raise ValueError(
                f"sequence parallel needs batch*seq = {h.shape[0]} tokens divisible by "
                f"tensor_parallel_degree={mesh.size()}"
            )
        # Embeddings (replicated under TP) -> sorted stream -> this rank's chunk.
        return shard_tokens(super().sort_stream(h, routing), mesh)

    def unsort_stream(
        self, h: torch.Tensor, routing: Routing, shape: Sequence[int]
    ) -> torch.Tensor:
        # Full activations: what the output head, or the next pipeline stage, expects on
        # every tensor-parallel rank (their grads arrive replicated).
        return super().unsort_stream(
            gather_tokens(h, self.sequence_parallel_mesh, grad_is_partial=False), routing, shape
        )


class SortedStreamParallel(ParallelStyle):
    """For the model: shard the sorted stream over the mesh after sorting, gather it before
    unsorting (the final norm, between the two, runs on the chunk)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _swap_class(module, _SequenceParallelMoTTransformer)
        module.sequence_parallel_mesh = device_mesh
        return module

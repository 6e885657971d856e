"""Sequence parallelism over the modality-SORTED (T, dim) residual stream.

Megatron-style SP shards activations along the token axis between the tensor-parallel
sublayers. MoT keeps its residual stream flat and sorted by modality, so the shard is a
contiguous chunk of the SORTED tokens: rank r holds sorted tokens [r*T/tp, (r+1)*T/tp).
Norms are per token, so they run on that chunk (with the chunk's modality ids). Before the
column-parallel projections the chunks are all-gathered; after the row-parallel ones the
partial sums are reduce-scattered back to chunks.

Every transition is a DTensor redistribute on the 1-D tensor-parallel mesh, so the backward
collective always matches the forward (all-gather <-> reduce-scatter, slice <-> all-gather)
and the blocks still compile with `fullgraph=True`. `mesh is None` (no tensor parallel)
makes every function the identity.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


def shard_tokens(x: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Full (T, ...) tensor, identical on every rank -> this rank's chunk of tokens.

    Backward all-gathers, so upstream (e.g. the embedding) sees the full, replicated grad.
    """
    if mesh is None:
        return x
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(
        placements=[Shard(0)]
    ).to_local()


def gather_tokens(x: torch.Tensor, mesh: DeviceMesh | None, grad_is_partial: bool) -> torch.Tensor:
    """This rank's chunk of tokens -> all T tokens (all-gather along dim 0).

    `grad_is_partial`: the consumers are column-parallel (each rank sees a slice of the
    output features), so the incoming gradient is a partial sum and backward reduce-scatters.
    Otherwise the gradient is already full on every rank and backward just slices it.
    """
    if mesh is None:
        return x
    full = DTensor.from_local(x, mesh, [Shard(0)], run_check=False).redistribute(
        placements=[Replicate()]
    )
    return full.to_local(grad_placements=[Partial()] if grad_is_partial else [Replicate()])


def reduce_scatter_tokens(x: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Partial sums of all T tokens (row-parallel output) -> this rank's reduced chunk."""
    if mesh is None:
        return x
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(
        placements=[Shard(0)]
    ).to_local()


def local_tokens(x: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """This rank's chunk of a (T, ...) tensor that needs no gradient (e.g. modality ids)."""
    if mesh is None:
        return x
    return x.view(mesh.size(), -1, *x.shape[1:])[mesh.get_local_rank()]

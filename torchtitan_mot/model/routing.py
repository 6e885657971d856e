"""Deterministic modality routing: computed once per forward, shared by every layer.

MoT unties every non-embedding weight by modality. Indexing `x[mask]` per projection (the
reference implementation) syncs the host, makes shapes data dependent and gathers the same
tokens again in every sublayer. Instead we

1. stably sort the flattened tokens by modality id ONCE per forward (`Routing`),
2. keep the residual stream in that sorted order through all blocks, so every per-modality
   Linear / norm works on a contiguous slice, and
3. leave sorted order only for attention (`Routing.unsort` / `Routing.sort`), which mixes all
   tokens in their original sequence order.

The per-modality matmul is one opaque custom op (`mot::routed_mm`) with fixed output shapes,
so `torch.compile(fullgraph=True)` traces a block once, whatever the modality mix of a batch.
It slices by group offsets held in HOST memory: `build_routing` counts the tokens per
modality on the host (the trainer keeps the ids there; ids given on the device cost one
small copy back, before any block runs), so no block ever waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import copy_without_waiting


@dataclass
class Routing:
    """Token grouping shared by all layers of one forward.

    `order[i]` is the flat (batch*seq) index of the i-th token in modality-sorted order,
    `inverse` undoes it, `sorted_ids` are the modality ids in sorted order (all on the
    tokens' device) and `offsets` are the cumulative group ends (the `torch._grouped_mm`
    convention) in host memory, read by `routed_mm` without a device sync. `order is None`
    means a single modality: the sort is the identity and is skipped.
    """

    order: torch.Tensor | None
    inverse: torch.Tensor | None
    sorted_ids: torch.Tensor
    offsets: torch.Tensor
    n_modalities: int

    def group_sizes(self) -> list[int]:
        """Tokens per modality as Python ints, read off the host-side offsets."""
        ends = self.offsets.tolist()
        return [end - start for start, end in zip([0, *ends[:-1]], ends)]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) tensor in original flat order -> modality-sorted order."""
        if self.order is None or self.inverse is None:
            return x
        return _PermuteRows.apply(x, self.order, self.inverse, None)

    def unsort(self, x: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """(T, ...) tensor in modality-sorted order -> original flat order, viewed as
        `shape` if given (the permuted result is a fresh tensor, not a view)."""
        if self.order is None or self.inverse is None:
            return x if shape is None else x.view(shape)
        return _PermuteRows.apply(x, self.inverse, self.order, shape)


class _PermuteRows(torch.autograd.Function):
    """`x.index_select(0, index)` for a permutation `index` whose inverse is known.

    The generic index_select backward scatter-adds into a zero-filled tensor (an extra
    fill, and a slow serial index_add on CPU); the gradient of a permutation is just the
    inverse permutation, one gather. With `shape` the rows are gathered straight into a
    tensor of that shape, which is then no view: pipeline schedules that split backward
    into input and weight passes detach stage outputs in place, which views do not allow.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
        shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if shape is None:
            return x.index_select(0, index)
        out = x.new_empty(x.view(shape).shape)
        torch.index_select(x, 0, index, out=out.view(x.shape))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])
        ctx.in_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.reshape(ctx.in_shape).index_select(0, inverse), None, None, None


def build_routing(
    modality_ids: torch.Tensor, n_modalities: int, device: torch.device | None = None
) -> Routing:
    """Group the tokens of a (batch, seq) id tensor by modality, on `device` (default: the
    ids' own).

    The trainer hands the ids over in host memory: they are counted there and copied to
    `device` without waiting for it, so the forward has no device->host transfer at all.
    Ids already on the device cost one small copy back (the n_modalities group ends).
    """
    given = modality_ids.reshape(-1)  # counted where it lives: on the host, no device read
    ids = copy_without_waiting(given, device or given.device)
    if n_modalities == 1:
        # The dense twin: every token takes modality 0's weights, no permutation.
        zeros = torch.zeros_like(ids)
        offsets = torch.full((1,), ids.numel(), dtype=torch.int32)
        return Routing(None, None, zeros, offsets, 1)
    order = torch.argsort(ids, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(given, minlength=n_modalities)
    offsets = torch.cumsum(counts, 0).to(device="cpu", dtype=torch.int32)
    return Routing(order, inverse, ids.index_select(0, order), offsets, n_modalities)


def modality_ids_from_masks(
    modality_masks: Sequence[torch.Tensor], shape: torch.Size
) -> torch.Tensor:
    """Convert the reference implementation's list of boolean masks to modality ids.

    The masks must partition the tokens: an overlap or an uncovered token is an error, never
    a silent guess.
    """
    if len(modality_masks) == 0:
        raise ValueError("modality_masks is empty: expected one boolean mask per modality")
    masks = torch.stack([m.to(torch.bool) for m in modality_masks])
    if masks.shape[1:] != shape:
        raise ValueError(
            f"modality_masks have shape {tuple(masks.shape[1:])}, tokens have {tuple(shape)}"
        )
    coverage = masks.sum(0)
    if bool((coverage > 1).any()):
        bad = (coverage > 1).nonzero()[0].tolist()
        raise ValueError(f"modality_masks overlap: token at (batch, pos) {bad} is in several")
    if bool((coverage == 0).any()):
        bad = (coverage == 0).nonzero()[0].tolist()
        raise ValueError(f"modality_masks leave token at (batch, pos) {bad} in no modality")
    return masks.to(torch.int64).argmax(0)


def check_modality_ids(modality_ids: torch.Tensor, n_modalities: int) -> None:
    """Reject ids outside [0, n_modalities): they would pick no (or a wrong) weight set.

    On an accelerator the check is asynchronous (no host sync); on CPU it names the values.
    """
    ok = (modality_ids >= 0).all() & (modality_ids < n_modalities).all()
    if modality_ids.device.type != "cpu":
        torch._assert_async(ok, f"modality_ids outside [0, {n_modalities})")
    elif not bool(ok):
        lo, hi = int(modality_ids.min()), int(modality_ids.max())
        raise ValueError(
            f"modality_ids must lie in [0, {n_modalities}) for a model built with "
            f"{n_modalities} modalities; got values in [{lo}, {hi}]"
        )


# --- the per-modality matmul ---------------------------------------------------------------


# A custom op with a host tensor input makes Inductor skip CUDA graphs for its graph; the
# tag says so explicitly (replayed graphs would bake in one batch's slice bounds).
_OP_TAGS = (torch.Tag.cudagraph_unsafe,)


def _routed_mm(x: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """y[s:e] = x[s:e] @ weights[m].T for modality m's sorted slice [s, e).

    `offsets` (group ends) live on the host, so reading them never syncs a GPU."""
    out = x.new_empty(x.shape[0], weights[0].shape[0])
    start = 0
    for w, end in zip(weights, offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w.t(), out=out[start:end])
        start = end
    return out


def _routed_mm_fake(x: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weights[0].shape[0])


# Two ops with one body: selective op activation checkpointing decides per op whether an
# output is saved. Its policy (infra/activation_checkpoint.py) saves `routed_mm`'s outputs and
# switches the projections it recomputes to `routed_mm_recompute` (`ModalityLinear.recompute`).
routed_mm = torch.library.custom_op("mot::routed_mm", mutates_args=(), tags=_OP_TAGS)(_routed_mm)
routed_mm_recompute = torch.library.custom_op(
    "mot::routed_mm_recompute", mutates_args=(), tags=_OP_TAGS
)(_routed_mm)
for _op in (routed_mm, routed_mm_recompute):
    _op.register_fake(_routed_mm_fake)


@torch.library.custom_op("mot::routed_mm_backward", mutates_args=(), tags=_OP_TAGS)
def routed_mm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: torch.Tensor,
    weight_needs_grad: list[bool],
) -> list[torch.Tensor]:
    """[grad_x, grad_w_0, ...]. An absent modality gets a zero gradient, never None, so
    data-parallel ranks reduce the same set of gradients; a weight that needs no gradient
    (a frozen modality) gets an empty one and costs no GEMM."""
    grad_x = x.new_empty(x.shape)
    grad_ws = [
        torch.empty_like(w) if needed else w.new_empty(0)
        for w, needed in zip(weights, weight_needs_grad)
    ]
    start = 0
    for w, gw, needed, end in zip(weights, grad_ws, weight_needs_grad, offsets.tolist()):
        if end > start:
            torch.mm(grad[start:end], w, out=grad_x[start:end])
            if needed:
                torch.mm(grad[start:end].t(), x[start:end], out=gw)
        elif needed:
            gw.zero_()
        start = end
    return [grad_x, *grad_ws]


@routed_mm_backward.register_fake
def _(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: torch.Tensor,
    weight_needs_grad: list[bool],
) -> list[torch.Tensor]:
    return [
        x.new_empty(x.shape),
        *[w.new_empty(w.shape if needed else 0) for w, needed in zip(weights, weight_needs_grad)],
    ]


def _routed_mm_setup_context(ctx, inputs, output) -> None:
    x, weights, offsets = inputs
    ctx.weight_needs_grad = [w.requires_grad for w in weights]
    ctx.save_for_backward(x, offsets, *weights)


def _routed_mm_backward(ctx, grad: torch.Tensor):
    x, offsets, *weights = ctx.saved_tensors
    grad_x, *grad_ws = routed_mm_backward(
        grad.contiguous(), x, weights, offsets, ctx.weight_needs_grad
    )
    grad_ws = [g if needed else None for g, needed in zip(grad_ws, ctx.weight_needs_grad)]
    return grad_x, grad_ws, None


for _op in (routed_mm, routed_mm_recompute):
    _op.register_autograd(_routed_mm_backward, setup_context=_routed_mm_setup_context)


class ModalityLinear(nn.ModuleList):
    """One bias-free Linear per modality, applied to modality-sorted tokens.

    Parameters are named `<name>.<modality_id>.weight`: the dense Llama3 name with the
    modality inserted, which keeps warm start and tensor-parallel plans readable.

    Plain `nn.Linear` children are multiplied by one `mot::routed_mm` call. A model
    converter may swap them for a subclass with its own forward (TorchTitan's float8
    converter makes them torchao `Float8Linear`s): each child then runs its own forward on
    its modality's slice, so the conversion takes effect for every modality.
    """

    def __init__(self, in_features: int, out_features: int, n_modalities: int) -> None:
        super().__init__(
            nn.Linear(in_features, out_features, bias=False) for _ in range(n_modalities)
        )
        self.recompute = False
        """Run as `mot::routed_mm_recompute`, the op whose output selective op activation
        checkpointing recomputes (set by its policy: infra/activation_checkpoint.py)."""
        self.fqn = ""
        """Set by the model to this module's name, for errors that must name a parameter."""

    @property
    def converted(self) -> bool:
        """Whether a model converter replaced the children by a Linear with its own forward."""
        return type(self[0]) is not nn.Linear

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.converted:
            return self[0](x) if len(self) == 1 else self._forward_children(x, routing)
        weights = [self._plain_weight(i) for i in range(len(self))]
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # Autocast does not reach inside a custom op: cast as it would cast F.linear's
            # operands (fp32 master weights, gradients flow back through the cast).
            dtype = torch.get_autocast_dtype(device_type)
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        if len(self) == 1:
            return F.linear(x, weights[0])
        op = routed_mm_recompute if self.recompute else routed_mm
        return op(x.contiguous(), weights, routing.offsets)

    def modality_weight(self, modality: int) -> torch.Tensor:
        """The weight the routed matmul multiplies for `modality` (tensor parallel swaps in a
        subclass that returns this rank's shard: infra/sequence_parallel.py)."""
        return self[modality].weight

    def _plain_weight(self, modality: int) -> torch.Tensor:
        weight = self.modality_weight(modality)
        if type(weight) not in (torch.Tensor, nn.Parameter):
            raise TypeError(
                f"{self.fqn}.{modality}.weight is a {type(weight).__name__}: mot::routed_mm "
                "multiplies plain tensors. Weight subclasses come with a converted Linear "
                "(e.g. quantize.linear.float8), whose own forward MoT calls per modality."
            )
        return weight

    def _forward_children(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each converted child on its modality's slice of the sorted tokens (eager only:
        the slice sizes are data; `validate_parallelism` refuses compiling such a model)."""
        outs = []
        for linear, rows in zip(self, torch.split(x, routing.group_sizes())):
            # No tokens: a plain (empty) matmul still gives this weight a zero gradient, so
            # every data-parallel rank reduces the same gradients (float8 scaling would
            # take the amax of no values).
            outs.append(linear(rows) if rows.shape[0] else F.linear(rows, linear.weight))
        return torch.cat(outs)


class _RoutedRMSNorm(torch.autograd.Function):
    """`rms_norm(x) * weight[ids]`, keeping only what the dense twin's fused RMSNorm keeps.

    Composed from differentiable ops, autograd would also save the normalised x and the
    gathered (T, dim) scale for the backward of the product: two extra activations per
    norm, 12% more activation memory than the dense twin at debugmodel size. Here
    only x, the per-token rstd and the ids are saved; backward recomputes the cheap rest.
    Statistics and the weight product are computed in (at least) float32 and rounded once
    to x's dtype, as in the fused kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight, ids)
        # Normalise and scale in float32, round once (as F.rms_norm; output in x's dtype).
        return (xf * rstd * _per_token(weight.to(xf.dtype), ids, x.dim())).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # With r = rstd and p = grad * x (one row per normalised vector: a token, or one
        # head of a token for a q/k norm):
        #   d weight[m] = sum over m's rows of r * p
        #   d x         = r * grad * w - x * r^3 * <p, w> / dim
        # Both reductions of p are skinny GEMMs against an (n_mod)-wide matrix, one read of
        # p each, so the backward makes about half the (T, dim) passes of the textbook form.
        x, rstd, weight, ids = ctx.saved_tensors
        dim = x.shape[-1]
        xf, g, wf = x.to(rstd.dtype), grad.to(rstd.dtype), weight.to(rstd.dtype)
        rows = rstd.numel()
        row_ids = ids.repeat_interleave(rows // ids.numel()).unsqueeze(1)
        r = rstd.view(rows, 1)
        p = (g * xf).reshape(rows, dim)
        r_by_modality = torch.zeros(rows, weight.shape[0], dtype=r.dtype, device=r.device)
        grad_weight = r_by_modality.scatter_(1, row_ids, r).t() @ p
        coef = (p @ wf.t()).gather(1, row_ids).mul_(r.pow(3)).div_(dim).view_as(rstd)
        grad_x = (g * _per_token(wf, ids, x.dim())).mul_(rstd).addcmul_(xf, coef, value=-1)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


def _per_token(weight: torch.Tensor, ids: torch.Tensor, ndim: int) -> torch.Tensor:
    """(n_mod, dim) weights -> (T, 1, ..., dim): each token's modality row, ready to broadcast."""
    scale = F.embedding(ids, weight)
    return scale.view(scale.shape[0], *([1] * (ndim - 2)), scale.shape[-1])


class ModalityRMSNorm(nn.ModuleList):
    """One RMSNorm weight per modality; each sorted token is scaled by its modality's weight.

    The weight is gathered per token (a (T, dim) read, like the norm itself), so no slice
    sizes and no host sync are needed, and it works on any shard of the sorted stream.
    """

    def __init__(self, dim: int, n_modalities: int, eps: float) -> None:
        super().__init__(nn.RMSNorm(dim, eps=eps) for _ in range(n_modalities))
        self.eps = eps

    def reset_parameters(self) -> None:
        for norm in self:
            norm.reset_parameters()

    def modality_weight(self, modality: int) -> torch.Tensor:
        """The weight that scales `modality`'s tokens (tensor parallel swaps in a subclass
        that returns this rank's local copy: infra/sequence_parallel.py)."""
        return self[modality].weight

    def forward(self, x: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """`x` is (T, ..., dim) in sorted order, `sorted_ids` (T,) its modality ids."""
        if len(self) == 1:
            return F.rms_norm(x, (x.shape[-1],), self.modality_weight(0), self.eps)
        weight = torch.stack([self.modality_weight(m) for m in range(len(self))])
        return _RoutedRMSNorm.apply(x, weight, sorted_ids, self.eps)

"""Per-modality mixture-of-experts FFN: TorchTitan's `MoE` on chosen modalities' slices.

The MoT paper's hybrid (§5) makes only the text FFN a 4-expert MoE and keeps every other
weight MoT; its MoE-4x baseline (§3.2.1) is a dense model whose FFN is an MoE for all tokens.
Both are this module: the FFN's weight sets (one per modality when `ffn` is untied, else one
shared by all tokens) are each either the dense SwiGLU (`MoTFeedForward`, one routed matmul
over all dense sets) or a TorchTitan `MoE` (token-choice top-k router, `GroupedExperts`,
auxiliary-loss-free load balancing by an expert bias).

The residual stream is modality-sorted, so every set's tokens are one contiguous slice,
found from the routing's host-side group ends (no device read). Every `MoE` module is called
on every forward, with an empty (1, 0, dim) slice when this forward holds none of its
modality's tokens: expert parallel's all-to-alls need every rank to enter them.
"""

import torch
from torch import nn
from torchtitan.models.moe import MoE, MoEArgs

from .feedforward import MoTFeedForward
from .routing import Routing


def grouped_mm_available() -> bool:
    """Whether `torch._grouped_mm` (TorchTitan's fast expert path) can run here: CUDA with
    compute capability 9.0+ (Hopper). Elsewhere (CPU, older GPUs) the experts run
    TorchTitan's for-loop path (`MoEArgs.use_grouped_mm=False`)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def moe_ffn_params(moe_args: MoEArgs, dim: int, hidden_dim: int) -> tuple[int, int]:
    """(total, active per token) parameters of one TorchTitan `MoE`: routed experts, router
    gate and shared experts; a token uses `top_k` routed experts, the gate and the shared ones."""
    expert = 3 * dim * hidden_dim
    gate = dim * moe_args.num_experts + (moe_args.num_experts if moe_args.gate_bias else 0)
    shared = expert * moe_args.num_shared_experts
    total = expert * moe_args.num_experts + gate + shared
    return total, expert * moe_args.top_k + gate + shared


class MoTMoEFeedForward(nn.Module):
    """The FFN of a block with MoE weight sets.

    `moe[str(s)]` is the TorchTitan `MoE` of weight set `s` (a modality id when the FFN is
    untied; "0", all tokens, when it is shared); `dense` holds the SwiGLU of the other sets,
    its i-th child serving `dense_sets[i]` (None when every set is an MoE). No set has both.
    """

    def __init__(
        self, dim: int, hidden_dim: int, n_sets: int, moe_sets: list[int], moe_args: MoEArgs
    ) -> None:
        super().__init__()
        self.n_sets = n_sets
        self.moe_sets = sorted(moe_sets)
        self.dense_sets = [s for s in range(n_sets) if s not in self.moe_sets]
        self.moe = nn.ModuleDict(
            {str(s): MoE(moe_args, dim=dim, hidden_dim=hidden_dim) for s in self.moe_sets}
        )
        self.dense = (
            MoTFeedForward(dim, hidden_dim, len(self.dense_sets)) if self.dense_sets else None
        )
        self._active_ffn = min(
            [moe_ffn_params(moe_args, dim, hidden_dim)[1]] * bool(self.moe_sets)
            + [3 * dim * hidden_dim] * bool(self.dense_sets)
        )

    def parameters_by_set(self) -> dict[int, list[nn.Parameter]]:
        """Parameters of each weight set (modality id when the FFN is untied)."""
        groups = {s: list(self.moe[str(s)].parameters()) for s in self.moe_sets}
        if self.dense is not None:
            for i, s in enumerate(self.dense_sets):
                groups[s] = [p for proj in (self.dense.w1, self.dense.w2, self.dense.w3)
                             for p in proj[i].parameters()]
        return groups

    def inactive_params(self) -> int:
        """Parameters a token does not compute with: all but the cheapest set's active ones
        (so a mix of MoE and dense modalities never overstates the FLOPs of a token)."""
        return sum(p.numel() for p in self.parameters()) - self._active_ffn

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """`x` is the (T, dim) sorted stream; each set's contiguous slice goes to its module."""
        if self.n_sets == 1:
            return self.moe["0"](x.unsqueeze(0)).squeeze(0)
        ends = routing.offsets.tolist()  # host memory: no device read
        bounds = list(zip([0, *ends[:-1]], ends))
        out: dict[int, torch.Tensor] = {
            s: self.moe[str(s)](x[slice(*bounds[s])].unsqueeze(0)).squeeze(0)
            for s in self.moe_sets
        }
        if self.dense is not None:
            sizes = [bounds[s][1] - bounds[s][0] for s in self.dense_sets]
            first, last = self.dense_sets[0], self.dense_sets[-1]
            if last - first + 1 == len(self.dense_sets):  # adjacent sets: one view, no copy
                dense_x = x[bounds[first][0]:bounds[last][1]]
            else:
                dense_x = torch.cat([x[slice(*bounds[s])] for s in self.dense_sets])
            # The dense SwiGLU's own routing: its sets' group ends (host memory) in that
            # buffer; ModalityLinear reads nothing else of it.
            sub = Routing(
                None, None, routing.sorted_ids[:0],
                torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                len(self.dense_sets),
            )
            out.update(zip(self.dense_sets, torch.split(self.dense(dense_x, sub), sizes)))
        return torch.cat([out[s] for s in range(self.n_sets)])

    def init_weights(self, init_std: float) -> None:
        for moe in self.moe.values():
            # The buffers (expert bias, token counts) are re-created where they already live.
            moe.init_weights(init_std, buffer_device=moe.tokens_per_expert.device)
        if self.dense is not None:
            self.dense.init_weights(init_std)

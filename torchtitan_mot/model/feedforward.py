"""Modality-untied SwiGLU feed-forward."""

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.utils import trunc_normal_

from .routing import ModalityLinear, Routing


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama3's SwiGLU hidden size, so MoT and Llama3 flavors have identical shapes."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MoTFeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x) on sorted tokens, with `n_sets` (w1, w2, w3): one per modality
    when the FFN is untied, one shared by all modalities otherwise."""

    def __init__(self, dim: int, hidden_dim: int, n_sets: int) -> None:
        super().__init__()
        self.w1 = ModalityLinear(dim, hidden_dim, n_sets)
        self.w2 = ModalityLinear(hidden_dim, dim, n_sets)
        self.w3 = ModalityLinear(dim, hidden_dim, n_sets)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, routing)) * self.w3(x, routing), routing)

    def init_weights(self, init_std: float) -> None:
        for linear in self.w1:
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        for proj in (self.w2, self.w3):
            for linear in proj:
                trunc_normal_(linear.weight, mean=0.0, std=init_std)

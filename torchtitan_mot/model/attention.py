"""Modality-untied attention projections around ONE global attention over all tokens."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.models.attention import (
    FlexAttentionWrapper,
    ScaledDotProductAttentionWrapper,
    VarlenAttentionWrapper,
    VarlenMetadata,
)
from torchtitan.models.llama3.model.model import apply_rotary_emb
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import AttentionMasksType

from .args import MoTModelArgs
from .routing import ModalityLinear, ModalityRMSNorm, Routing


class MoTAttention(nn.Module):
    """Per-modality wq/wk/wv/wo (and optional QK-norm); attention itself is shared.

    The projections are untied if `untie` lists "attention", the QK-norms if it lists "norms";
    otherwise each has one weight set for all modalities.

    Input and output are (T, dim) in modality-sorted order. q/k/v are un-sorted into the
    original (batch, seq) order so RoPE sees original positions and every token attends to
    every earlier token of its sequence (or document), whatever its modality.
    """

    def __init__(self, model_args: MoTModelArgs) -> None:
        super().__init__()
        n_proj, n_norms = model_args.n_copies("attention"), model_args.n_copies("norms")
        self.n_heads = model_args.n_heads
        self.n_kv_heads = model_args.n_kv_heads or model_args.n_heads
        self.head_dim = model_args.dim // model_args.n_heads
        self.enable_gqa = self.n_heads > self.n_kv_heads
        dim = model_args.dim
        self.wq = ModalityLinear(dim, self.n_heads * self.head_dim, n_proj)
        self.wk = ModalityLinear(dim, self.n_kv_heads * self.head_dim, n_proj)
        self.wv = ModalityLinear(dim, self.n_kv_heads * self.head_dim, n_proj)
        self.wo = ModalityLinear(self.n_heads * self.head_dim, dim, n_proj)
        self.q_norm = self.k_norm = None
        if model_args.qk_norm:
            self.q_norm = ModalityRMSNorm(self.head_dim, n_norms, model_args.norm_eps)
            self.k_norm = ModalityRMSNorm(self.head_dim, n_norms, model_args.norm_eps)

        self.attn_type = model_args.attn_type
        self.inner_attention: nn.Module
        match self.attn_type:
            case "flex":
                self.inner_attention = FlexAttentionWrapper()
            case "varlen":
                self.inner_attention = VarlenAttentionWrapper()
            case "sdpa":
                self.inner_attention = ScaledDotProductAttentionWrapper()
            case _:
                raise ValueError(f"Unknown attention type: {self.attn_type}")

    def init_weights(self, init_std: float) -> None:
        """Llama3's init, drawn independently for every modality copy."""
        for proj in (self.wq, self.wk, self.wv):
            for linear in proj:
                trunc_normal_(linear.weight, mean=0.0, std=0.02)
        for linear in self.wo:
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        batch_shape: tuple[int, int],
        freqs_cis: torch.Tensor,
        attention_masks: AttentionMasksType | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bs, seqlen = batch_shape
        # -1 heads: tensor parallel may have sharded the projections' output features.
        xq = self.wq(x, routing).unflatten(-1, (-1, self.head_dim))
        xk = self.wk(x, routing).unflatten(-1, (-1, self.head_dim))
        xv = self.wv(x, routing)
        if self.q_norm is not None and self.k_norm is not None:
            xq = self.q_norm(xq, routing.sorted_ids)
            xk = self.k_norm(xk, routing.sorted_ids)

        xq = routing.unsort(xq).view(bs, seqlen, -1, self.head_dim)
        xk = routing.unsort(xk).view(bs, seqlen, -1, self.head_dim)
        xv = routing.unsort(xv).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, heads, seq, head_dim)

        match self.attn_type:
            case "flex":
                assert isinstance(attention_masks, BlockMask), attention_masks
                out = self.inner_attention(
                    xq, xk, xv, block_mask=attention_masks, enable_gqa=self.enable_gqa
                ).transpose(1, 2)
            case "varlen":
                assert isinstance(attention_masks, VarlenMetadata), attention_masks
                out = self.inner_attention(xq, xk, xv, attention_masks)
            case _ if attention_masks is not None:
                # An explicit boolean mask (the Transfusion mask, model/diffusion.py): sdpa
                # with attn_mask, since TorchTitan's wrapper only runs is_causal.
                assert isinstance(attention_masks, torch.Tensor), type(attention_masks)
                out = F.scaled_dot_product_attention(
                    xq, xk, xv, attn_mask=attention_masks, enable_gqa=self.enable_gqa
                ).transpose(1, 2)
            case _:
                out = self.inner_attention(xq, xk, xv, enable_gqa=self.enable_gqa).transpose(
                    1, 2
                )
        out = routing.sort(out.reshape(bs * seqlen, -1))
        return self.wo(out, routing)

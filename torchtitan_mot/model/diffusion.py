"""The Transfusion setting's image layers and its attention mask.

An image is BOI, its latent positions, EOI. At a latent position the token embedding (of the
BOI placeholder id) is replaced by `patch_in(x_t) + time_embed(t)`; the final hidden state
there is read out by `patch_out` as the predicted noise eps. The layers are computed on every
position and selected with `torch.where`: a fixed shape for any image layout (one compiled
graph, no host sync, no data-dependent gather), at a cost of P*dim + dim^2 multiply-adds per
position, well under 1% of a block's. With one diffusion modality they are that modality's
own layers (nothing else reads them).

Attention: causal OR same image (a latent position sees every position of its own image,
also later ones), AND same document under block_causal.
"""

import math

import torch
from torch import nn
from torch.nn.attention.flex_attention import and_masks, or_masks
from torchtitan.models.attention import get_causal_mask_mod
from torchtitan.models.utils import trunc_normal_

from .args import MoTModelArgs

TIME_FREQUENCIES = 256
"""Width of the sinusoidal timestep features fed to the timestep MLP (Flux's and DiT's 256)."""


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQUENCIES) -> torch.Tensor:
    """Flux's sinusoidal `timestep_embedding` (cos, then sin; max period 10000) on integer
    DDPM steps, rewritten because Flux's enters a `torch.device` context that
    `torch.compile(fullgraph=True)` cannot trace."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusionLayers(nn.ModuleDict):
    """Patch encoder (Linear P -> dim), timestep embedding (sinusoidal + 2-layer MLP, as
    TorchTitan's Flux) and patch decoder (Linear dim -> P).

    A ModuleDict so that pipeline parallel can keep `patch_in` and `time_embed` on the first
    stage and `patch_out` on the last (TorchTitan's stage split keeps named entries of a
    ModuleDict; `infra/pipeline.py`); the parameter names are those of plain attributes.
    """

    def __init__(self, model_args: MoTModelArgs) -> None:
        if model_args.patch_dim <= 0:
            raise ValueError(
                "MoTModelArgs.patch_dim is unset: it comes from meta.json's latent shape and "
                "mot.diffusion_patch_size through update_from_config"
            )
        super().__init__({
            "patch_in": nn.Linear(model_args.patch_dim, model_args.dim),
            "time_embed": _flux_mlp_embedder(TIME_FREQUENCIES, model_args.dim),
            "patch_out": nn.Linear(model_args.dim, model_args.patch_dim),
        })

    @torch.no_grad()
    def init_weights(self) -> None:
        """Small normal weights, zero biases. The decoder is NOT zero-initialised (BAGEL
        does that): a zero decoder would stop the image loss's gradient from reaching the
        transformer at step 0; eps starts near 0 anyway (MSE near 1)."""
        for name in ("patch_in", "patch_out"):
            if name in self:  # a pipeline stage holds only its own part
                trunc_normal_(self[name].weight, mean=0.0, std=0.02)
                nn.init.zeros_(self[name].bias)
        if "time_embed" in self:
            self.time_embed.init_weights(0.02)

    def embed(
        self,
        h: torch.Tensor,
        patches: torch.Tensor,
        timesteps: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> torch.Tensor:
        """`h` (bs, seq, dim) token embeddings with latent positions (`image_ids >= 0`)
        replaced by the noised patch's and its timestep's embedding."""
        bs, seq = image_ids.shape
        temb = timestep_features(timesteps.reshape(-1))
        x = self.patch_in(patches.to(self.patch_in.weight.dtype)) + self.time_embed(
            temb.to(self.patch_in.weight.dtype)
        ).view(bs, seq, -1)
        return torch.where((image_ids >= 0).unsqueeze(-1), x.to(h.dtype), h)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted noise (bs, seq, P) from the final (normed) hidden state; meaningful at
        latent positions only."""
        return self.patch_out(h)


def same_image_mask_mod(image_ids: torch.Tensor):
    """flex mask_mod: query and key are latent positions of the same image."""

    def same_image(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_image = image_ids[b, q_idx]
        return (q_image >= 0) & (q_image == image_ids[b, kv_idx])

    return same_image


def transfusion_mask_mod(image_ids: torch.Tensor, document_mask_mod=None):
    """flex mask_mod of the Transfusion mask: (causal OR same image) AND same document
    (`document_mask_mod`, TorchTitan's `get_document_mask_mod`, under block_causal)."""
    mask = or_masks(get_causal_mask_mod(), same_image_mask_mod(image_ids))
    return mask if document_mask_mod is None else and_masks(mask, document_mask_mod)


def transfusion_dense_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """The same mask (causal OR same image) as an explicit (bs, 1, seq, seq) boolean for
    sdpa, where flex attention cannot run (e.g. its backward on CPU)."""
    seq = image_ids.shape[1]
    pos = torch.arange(seq, device=image_ids.device)
    causal = pos.view(seq, 1) >= pos.view(1, seq)
    same = (image_ids.unsqueeze(2) == image_ids.unsqueeze(1)) & (image_ids >= 0).unsqueeze(2)
    return (causal | same).unsqueeze(1)


def _flux_mlp_embedder(in_dim: int, dim: int) -> nn.Module:
    """Flux's timestep MLP, imported only when a Transfusion model is built: importing
    `torchtitan.models.flux` loads its datasets (transformers, torchao), whose import-time
    messages would reach every command line tool."""
    from torchtitan.models.flux.model.layers import MLPEmbedder

    return MLPEmbedder(in_dim, dim)

"""The Mixture-of-Transformers decoder."""

from collections.abc import Sequence

import torch
from torch import nn
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.models.attention import create_attention_mask, get_document_mask_mod
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.model import AttentionMasksType
from torchtitan.protocols.train_spec import ModelProtocol

from .args import MoTModelArgs
from .attention import MoTAttention
from .diffusion import DiffusionLayers, transfusion_dense_mask, transfusion_mask_mod
from .feedforward import ffn_hidden_dim, MoTFeedForward
from .inputs import HostTensor
from .moe import MoTMoEFeedForward
from .routing import (
    build_routing,
    check_modality_ids,
    ModalityLinear,
    ModalityRMSNorm,
    modality_ids_from_masks,
    Routing,
)


def block_init_std(layer_id: int, model_args: MoTModelArgs) -> float:
    """Llama3's init std of a block's output projections (and of an MoE router gate)."""
    depth = layer_id + 1 if model_args.depth_init else model_args.n_layers
    return 0.02 / (2 * depth) ** 0.5


class MoTBlock(nn.Module):
    """A Llama3 pre-norm block whose norms, projections and FFN are untied by modality
    (each only if `model_args.untie` lists it; otherwise one shared weight set).

    Pre-norm (norm on the sublayer input, residual add after) as in Llama3, so an MoT whose
    modality copies all hold one dense checkpoint computes exactly that checkpoint.
    Works on the (T, dim) residual stream in modality-sorted order.
    """

    def __init__(self, layer_id: int, model_args: MoTModelArgs) -> None:
        super().__init__()
        n_norms = model_args.n_copies("norms")
        self.attention = MoTAttention(model_args)
        hidden = ffn_hidden_dim(model_args.dim, model_args.multiple_of, model_args.ffn_dim_multiplier)
        # Experts have the dense FFN's hidden size: top-1 routing is FLOP-matched (MoE-4x).
        self.feed_forward: MoTFeedForward | MoTMoEFeedForward = (
            MoTMoEFeedForward(
                model_args.dim, hidden, model_args.n_copies("ffn"),
                model_args.moe_modalities, model_args.moe_args,
            )
            if model_args.moe_modalities
            else MoTFeedForward(model_args.dim, hidden, model_args.n_copies("ffn"))
        )
        self.attention_norm = ModalityRMSNorm(model_args.dim, n_norms, model_args.norm_eps)
        self.ffn_norm = ModalityRMSNorm(model_args.dim, n_norms, model_args.norm_eps)
        self.weight_init_std = block_init_std(layer_id, model_args)

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        batch_shape: tuple[int, int],
        freqs_cis: torch.Tensor,
        attention_masks: AttentionMasksType | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` is the sorted (T, dim) stream (under sequence parallel this rank's chunk of
        it: the hooks `apply_tp` installs gather and scatter tokens around the sublayers)."""
        ids = routing.sorted_ids
        h = x + self.attention(
            self.attention_norm(x, ids), routing, batch_shape, freqs_cis, attention_masks, positions
        )
        return h + self.feed_forward(self.ffn_norm(h, ids), routing)

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class MoTTransformer(Transformer):
    """Llama3's Transformer with MoT blocks.

    Token embedding, final norm and output head are shared across modalities (the paper's
    setting); RoPE tables, attention masks and weight init are Llama3's own (inherited).
    Only the blocks differ, and they run on a modality-sorted residual stream.
    """

    def __init__(self, model_args: MoTModelArgs) -> None:
        ModelProtocol.__init__(self, model_args)  # Llama3's __init__ would build dense blocks
        if model_args.vocab_size <= 0:
            raise ValueError(
                "MoTModelArgs.vocab_size is unset: it comes from the tokenizer through "
                "update_from_config(job_config), or set it explicitly"
            )
        self.model_args = model_args
        self.vocab_size = model_args.vocab_size
        self.n_layers = model_args.n_layers
        self.n_modalities = model_args.n_modalities
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        self.layers = nn.ModuleDict(
            {str(i): MoTBlock(i, model_args) for i in range(model_args.n_layers)}
        )
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        self.diffusion = DiffusionLayers(model_args) if model_args.diffusion else None
        for name, module in self.named_modules():
            if isinstance(module, ModalityLinear):
                module.fqn = name

    def forward(
        self,
        tokens: torch.Tensor,
        modality_ids: torch.Tensor | HostTensor | None = None,
        modality_masks: Sequence[torch.Tensor] | None = None,
        attention_masks: AttentionMasksType | None = None,
        positions: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`tokens` are (batch, seq) ids, or (batch, seq, dim) activations on a later
        pipeline stage. Give the modality of every token either as `modality_ids`
        (batch, seq) ints or as the reference form `modality_masks`, one boolean
        (batch, seq) or flattened (batch*seq,) mask per modality, also positionally
        (`model(tokens, masks)`). A dense twin (n_modalities=1) may omit both.
        Ids in host memory spare the forward its only device->host copy; wrap them in
        `HostTensor` (the trainer does) so FSDP / DDP do not move them to the device first.

        Transfusion flavors (`model_args.diffusion`): `patches` (batch, seq, P) are the
        NOISED latents x_t, `timesteps` (batch, seq) their t, `image_ids` (batch, seq) the
        image index of each latent position (-1 elsewhere); all on the tokens' device. The
        model then returns (logits, eps (batch, seq, P)). Without `patches` it returns the
        logits alone, computed exactly as by a model without diffusion layers.
        """
        if isinstance(modality_ids, HostTensor):
            modality_ids = modality_ids.tensor
        elif isinstance(modality_ids, (list, tuple)):
            # The reference API: `model(tokens, modality_masks)`, masks given positionally.
            if modality_masks is not None:
                raise ValueError("give modality_ids or modality_masks, not both")
            modality_ids, modality_masks = None, modality_ids
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        bs, seqlen = h.shape[:2]
        diffusing = patches is not None
        if diffusing:
            if self.diffusion is None:
                raise ValueError(
                    "patches given to a model without diffusion layers: use a Transfusion "
                    "flavor (model_args.diffusion)"
                )
            if timesteps is None or image_ids is None:
                raise ValueError("patches need their timesteps and image_ids")
            if self.tok_embeddings is not None:
                h = self.diffusion.embed(h, patches, timesteps, image_ids)
            if self.model_args.attn_type == "sdpa":
                attention_masks = transfusion_dense_mask(image_ids)
        if modality_masks is not None:
            # The reference flattens masks to (batch*seq,); same tokens, same meaning.
            modality_masks = [
                m.view(bs, seqlen) if m.dim() == 1 and m.numel() == bs * seqlen else m
                for m in modality_masks
            ]
            if modality_ids is not None:
                raise ValueError("give modality_ids or modality_masks, not both")
            if len(modality_masks) != self.n_modalities:
                raise ValueError(
                    f"got {len(modality_masks)} modality_masks for a model built with "
                    f"{self.n_modalities} modalities"
                )
            modality_ids = modality_ids_from_masks(modality_masks, torch.Size((bs, seqlen)))
        if modality_ids is None:
            if self.n_modalities != 1:
                raise ValueError("an MoT model needs modality_ids (or modality_masks)")
            modality_ids = torch.zeros((bs, seqlen), dtype=torch.long, device=h.device)
        elif modality_ids.shape != (bs, seqlen):
            raise ValueError(
                f"modality_ids shape {tuple(modality_ids.shape)} != tokens {(bs, seqlen)}"
            )
        if self.n_modalities > 1 and not torch.compiler.is_compiling():
            check_modality_ids(modality_ids, self.n_modalities)

        routing = build_routing(modality_ids, self.n_modalities, h.device)
        h = self.sort_stream(h.reshape(bs * seqlen, -1), routing)
        for layer in self.layers.values():
            h = layer(h, routing, (bs, seqlen), self.freqs_cis, attention_masks, positions)
        # The final norm is per token: it runs on the sorted stream.
        h = self.norm(h) if self.norm is not None else h
        h = self.unsort_stream(h, routing, (bs, seqlen, -1))
        if self.output is not None:
            if diffusing:
                return self.output(h), self.diffusion.decode(h)
            return self.output(h)
        # A pipeline stage's output must not be a view (zero-bubble schedules detach it in
        # place); only the dense twin's unpermuted stream still is one.
        return h.clone() if h._base is not None else h

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Llama3's init, plus the diffusion layers of a Transfusion flavor."""
        super().init_weights(buffer_device=buffer_device)
        if isinstance(self.diffusion, DiffusionLayers):  # a middle pipeline stage holds none
            self.diffusion.init_weights()

    def get_attention_masks(
        self,
        input_batch: torch.Tensor,
        tokenizer: BaseTokenizer,
        extra_inputs: dict[str, torch.Tensor] | None = None,
    ) -> AttentionMasksType:
        """Llama3's masks; with `image_ids` in `extra_inputs` (a Transfusion batch) and flex
        attention, the block mask of (causal OR same image) AND same document."""
        image_ids = (extra_inputs or {}).get("image_ids")
        if image_ids is None or self.diffusion is None:
            return super().get_attention_masks(input_batch, tokenizer, extra_inputs)
        if self.model_args.attn_type != "flex":
            raise ValueError(
                f"attn_type '{self.model_args.attn_type}' cannot express the Transfusion mask "
                "(bidirectional within an image): use 'flex' or 'sdpa'"
            )
        document = None
        if self.model_args.attn_mask_type == "block_causal":
            assert tokenizer.eos_id is not None
            document = get_document_mask_mod(input_batch, tokenizer.eos_id)
        batch = input_batch.shape[0]
        seq = input_batch.shape[1]
        return create_attention_mask(
            transfusion_mask_mod(image_ids, document), batch, None, seq, seq
        )

    def sort_stream(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        """(T, dim) embeddings in original order -> the blocks' modality-sorted stream.
        Sequence parallel overrides this and `unsort_stream` (infra/sequence_parallel.py)."""
        return routing.sort(h)

    def unsort_stream(
        self, h: torch.Tensor, routing: Routing, shape: Sequence[int]
    ) -> torch.Tensor:
        """The blocks' sorted stream -> activations in original order, viewed as `shape`."""
        return routing.unsort(h, shape)

"""MoT model arguments: Llama3's arguments plus the modality count."""

from dataclasses import dataclass

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.utils import get_dense_model_nparams_and_flops


@dataclass
class MoTModelArgs(TransformerModelArgs):
    """Llama3 shapes with every non-embedding weight untied across `n_modalities`.

    `n_modalities == 1` is the dense twin (all modalities share one set of weights): the
    baseline for every speed and quality comparison, built by the same code.
    `vocab_size == 0` means "take it from the tokenizer" (the unified multimodal vocabulary).
    """

    vocab_size: int = 0
    n_modalities: int = 2
    qk_norm: bool = False
    """Per-modality RMSNorm on queries and keys (per head), before RoPE."""

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        mot = getattr(job_config, "mot", None)
        if mot is None:
            raise ValueError(
                "the [mot] config section is missing: set job.custom_config_module = "
                "'torchtitan_mot.config' (python -m torchtitan_mot.train does this for you)"
            )
        n_data = len(mot.modalities)
        if self.n_modalities not in (1, n_data):
            raise ValueError(
                f"model.flavor '{job_config.model.flavor}' has n_modalities="
                f"{self.n_modalities} but mot.modalities lists {n_data}: {mot.modalities}. "
                "Pick a flavor built for that many modalities (or a dense one)."
            )
        from torchtitan_mot.data.tokenizer import build_mot_tokenizer

        vocab_size = build_mot_tokenizer(job_config).get_vocab_size()
        if self.vocab_size not in (0, vocab_size):
            raise ValueError(
                f"model vocab_size={self.vocab_size} disagrees with the tokenizer's unified "
                f"vocabulary of {vocab_size} ids (text vocab from "
                f"{job_config.model.hf_assets_path} + codebooks {mot.codebook_sizes})"
            )
        self.vocab_size = vocab_size

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """All parameters, but ACTIVE flops: each token uses one modality's weights.

        Counting all modality copies would inflate MFU n_modalities-fold; with this count
        MoT and its dense twin of the same shape report the same flops per token.
        """
        nparams, flops = get_dense_model_nparams_and_flops(
            self, model, 2 * (self.dim // self.n_heads), seq_len
        )
        from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm

        untied = sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, (ModalityLinear, ModalityRMSNorm))
            for p in m.parameters()
        )
        inactive = untied - untied // self.n_modalities
        return nparams, flops - 6 * inactive

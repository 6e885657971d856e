"""MoT model arguments: Llama3's arguments plus the modality count and what is untied."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.utils import get_dense_model_nparams_and_flops

UNTIE_COMPONENTS = ("attention", "ffn", "norms")
"""What `untie` may list: the attention projections (wq/wk/wv/wo), the SwiGLU FFN (w1/w2/w3)
and every RMSNorm of a block (attention_norm, ffn_norm and the optional QK-norms)."""

LATENTS_ATTRIBUTE = "resolved_latents"
"""Attribute of a job config's `[mot]` section holding each diffusion modality's latent shape
`{modality: (C, H, W)}` from meta.json, set by `load_job_config` like the vocabulary."""

VOCAB_ATTRIBUTE = "resolved_vocab"
"""Attribute of a job config's `[mot]` section holding its unified vocabulary (`VocabLayout`),
set by `torchtitan_mot.config.load_job_config`; not a config field, so no flag can set it."""


def check_untie(untie: Sequence[str], n_modalities: int, setting: str = "mot.untie") -> None:
    """Reject unknown or repeated components, and an empty list for a multi-modality model
    (it would build a dense model that still routes tokens: use a dense flavor instead).

    A dense flavor (n_modalities=1) has nothing to untie: only the default (all) and [] are
    accepted there, since any other list would silently change nothing.
    """
    allowed = f"allowed values: {list(UNTIE_COMPONENTS)} (each at most once)"
    unknown = [c for c in untie if c not in UNTIE_COMPONENTS]
    if unknown:
        raise ValueError(f"{setting} = {list(untie)}: unknown component(s) {unknown}; {allowed}")
    repeated = sorted({c for c in untie if list(untie).count(c) > 1})
    if repeated:
        raise ValueError(f"{setting} = {list(untie)}: {repeated} listed more than once; {allowed}")
    if n_modalities > 1 and not untie:
        raise ValueError(
            f"{setting} = []: with nothing untied an MoT flavor is its dense twin; use a dense "
            f"flavor (e.g. debugmodel_dense) instead, or list some of {list(UNTIE_COMPONENTS)}"
        )
    if n_modalities == 1 and untie and set(untie) != set(UNTIE_COMPONENTS):
        raise ValueError(
            f"{setting} = {list(untie)} has no effect on a dense flavor (n_modalities=1): "
            "pick an MoT flavor to untie only some components"
        )


@dataclass
class MoTModelArgs(TransformerModelArgs):
    """Llama3 shapes with the block weights listed in `untie` untied across `n_modalities`
    (by default all of them: the paper's MoT).

    `n_modalities == 1` is the dense twin (all modalities share one set of weights): the
    baseline for every speed and quality comparison, built by the same code.
    `vocab_size == 0` means "take it from the tokenizer" (the unified multimodal vocabulary).
    """

    vocab_size: int = 0
    n_modalities: int = 2
    qk_norm: bool = False
    """Per-modality RMSNorm on queries and keys (per head), before RoPE."""
    untie: list[str] = field(default_factory=lambda: list(UNTIE_COMPONENTS))
    """Components with one weight set per modality (`UNTIE_COMPONENTS`); the others have a
    single set shared by all modalities, exactly the dense layer. Set from `mot.untie`."""
    diffusion: bool = False
    """The Transfusion setting: the model has patch encoder/decoder and timestep embedding
    layers (`model/diffusion.py`) and returns (logits, eps). Fixed by the flavor."""
    diffusion_modality: int = -1
    """Index (in `mot.modalities`) of the one modality given as continuous latents; set from
    `mot.diffusion_modalities`."""
    patch_dim: int = 0
    """P = C * p * p: the latent values of one transformer position (C latent channels from
    meta.json, p = `mot.diffusion_patch_size`)."""

    def __post_init__(self) -> None:
        check_untie(self.untie, self.n_modalities, "MoTModelArgs.untie")
        if self.diffusion and self.attn_type == "varlen":
            raise ValueError(
                "MoTModelArgs(diffusion=True, attn_type='varlen'): varlen attention cannot "
                "express bidirectional attention within an image; use 'flex' or 'sdpa'"
            )
        if self.diffusion and self.attn_type == "sdpa" and self.attn_mask_type == "block_causal":
            raise ValueError(
                "MoTModelArgs(diffusion=True, attn_type='sdpa', attn_mask_type='block_causal'): "
                "the explicit sdpa mask has no document mask; use attn_type='flex'"
            )

    def n_copies(self, component: str) -> int:
        """How many weight sets `component` has: one per modality if untied, else one."""
        if component not in UNTIE_COMPONENTS:
            raise ValueError(f"unknown component {component!r}; one of {UNTIE_COMPONENTS}")
        return self.n_modalities if component in self.untie else 1

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters, from the shapes alone (analytic).

        Active counts one weight set per component: what a single token computes with.
        """
        from .feedforward import ffn_hidden_dim

        head_dim = self.dim // self.n_heads
        kv_heads = self.n_kv_heads or self.n_heads
        hidden = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        per_set = {
            "attention": 2 * self.dim * head_dim * (self.n_heads + kv_heads),
            "ffn": 3 * self.dim * hidden,
            "norms": 2 * self.dim + (2 * head_dim if self.qk_norm else 0),
        }
        shared = 2 * self.vocab_size * self.dim + self.dim  # embedding, output head, final norm
        total = shared + self.n_layers * sum(self.n_copies(c) * n for c, n in per_set.items())
        return total, shared + self.n_layers * sum(per_set.values())

    def update_from_config(
        self, job_config: JobConfig, vocab_size: int | None = None, **kwargs
    ) -> None:
        """Apply the config; the vocabulary size is that of the unified vocabulary
        `load_job_config` resolved unless `vocab_size` gives it (a plan for a machine without
        the tokenizer)."""
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
        # TorchTitan 0.2.2 splits a list[str] flag on ",": `--mot.untie ""` arrives as [""].
        untie = [] if list(mot.untie) == [""] else list(mot.untie)
        check_untie(untie, self.n_modalities)
        self.untie = untie
        if vocab_size is None:
            vocab = getattr(mot, VOCAB_ATTRIBUTE, None)
            if vocab is None:
                raise ValueError(
                    "the job config has no resolved vocabulary: load it with "
                    "torchtitan_mot.config.load_job_config"
                )
            vocab_size = vocab.vocab_size
        if self.vocab_size not in (0, vocab_size):
            raise ValueError(
                f"model vocab_size={self.vocab_size} disagrees with the tokenizer's unified "
                f"vocabulary of {vocab_size} ids (text vocab from "
                f"{job_config.model.hf_assets_path} + codebooks {mot.codebook_sizes})"
            )
        self.vocab_size = vocab_size
        self._update_diffusion(job_config)

    def _update_diffusion(self, job_config: JobConfig) -> None:
        """Diffusion modality and patch size from `[mot]` and the resolved latent shapes; a
        flavor and a config that disagree on having diffusion layers is an error."""
        mot = job_config.mot
        flavor = job_config.model.flavor
        names = list(getattr(mot, "diffusion_modalities", []) or [])
        if not names:
            if self.diffusion:
                raise ValueError(
                    f"model.flavor '{flavor}' is a Transfusion flavor (diffusion layers) but "
                    "mot.diffusion_modalities is empty: set it (e.g. [\"image\"]) with a latent "
                    "dataset, or pick a flavor without diffusion layers"
                )
            return
        if not self.diffusion:
            raise ValueError(
                f"mot.diffusion_modalities = {names} but model.flavor '{flavor}' has no "
                "diffusion layers: pick a Transfusion flavor (e.g. debugmodel_transfusion)"
            )
        if len(names) != 1:
            raise ValueError(
                f"mot.diffusion_modalities = {names}: exactly one diffusion modality is supported"
            )
        latents = getattr(mot, LATENTS_ATTRIBUTE, None) or {}
        if names[0] not in latents:
            raise ValueError(
                f"mot.diffusion_modalities = {names}: no latent shape for {names[0]!r} (the "
                "dataset's meta.json 'latents'); load the config with load_job_config"
            )
        channels, height, width = latents[names[0]]
        p = mot.diffusion_patch_size
        if p < 1 or height % p or width % p:
            raise ValueError(
                f"mot.diffusion_patch_size = {p} does not divide the latent's {height}x{width} "
                f"grid ({names[0]!r} in meta.json)"
            )
        self.diffusion_modality = list(mot.modalities).index(names[0])
        self.patch_dim = channels * p * p

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """All parameters, but ACTIVE flops: each token uses one weight set per component.

        Counting all modality copies would inflate MFU n_modalities-fold; with this count
        MoT (whatever it unties) and its dense twin of the same shape report the same flops
        per token. A shared (one-child) module has no inactive copies. The Transfusion patch
        layers and timestep MLP run on every position (`model/diffusion.py`), so TorchTitan's
        6 * params count already holds them.
        """
        nparams, flops = get_dense_model_nparams_and_flops(
            self, model, 2 * (self.dim // self.n_heads), seq_len
        )
        from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm

        inactive = sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, (ModalityLinear, ModalityRMSNorm))
            for child in list(m)[1:]
            for p in child.parameters()
        )
        return nparams, flops - 6 * inactive

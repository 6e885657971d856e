"""MoT model arguments: Llama3's arguments plus the modality count and what is untied."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.moe import MoEArgs
from torchtitan.models.utils import get_dense_model_nparams_and_flops

UNTIE_COMPONENTS = ("attention", "ffn", "norms")
"""What `untie` may list: the attention projections (wq/wk/wv/wo), the SwiGLU FFN (w1/w2/w3)
and every RMSNorm of a block (attention_norm, ffn_norm and the optional QK-norms)."""

LATENTS_ATTRIBUTE = "resolved_latents"
"""Attribute of a job config's `[mot]` section holding each diffusion modality's latent shape
`{modality: (C, H, W)}` from meta.json, set by `load_job_config` like the vocabulary."""
MOE_SCORE_FUNCS = ("softmax", "sigmoid")
"""Router score functions of TorchTitan's `TokenChoiceTopKRouter`."""


def default_moe_args() -> MoEArgs:
    """The paper's MoE-4x shape: 4 experts, one active per token (FLOP-matched to the dense
    FFN: each expert has the dense hidden size), no shared expert, softmax router, TorchTitan's
    expert-bias load balancing. `use_grouped_mm` is set for the machine by `update_from_config`."""
    return MoEArgs(
        num_experts=4, num_shared_experts=0, top_k=1, score_func="softmax",
        use_grouped_mm=False, load_balance_coeff=1e-3,
    )


def check_moe_args(moe_args: MoEArgs, prefix: str = "mot.moe_") -> None:
    """Reject an MoE shape TorchTitan would fail on late (or silently accept)."""
    if moe_args.num_experts < 1:
        raise ValueError(f"{prefix}num_experts = {moe_args.num_experts}: need at least 1 expert")
    if not 1 <= moe_args.top_k <= moe_args.num_experts:
        raise ValueError(
            f"{prefix}top_k = {moe_args.top_k}: must lie in [1, num_experts = "
            f"{moe_args.num_experts}]"
        )
    if moe_args.num_shared_experts < 0:
        raise ValueError(f"{prefix}num_shared_experts = {moe_args.num_shared_experts}: must be >= 0")
    if moe_args.score_func not in MOE_SCORE_FUNCS:
        raise ValueError(
            f"{prefix}score_func = {moe_args.score_func!r}: one of {list(MOE_SCORE_FUNCS)}"
        )
    if moe_args.load_balance_coeff is not None and moe_args.load_balance_coeff <= 0:
        raise ValueError(
            f"{prefix}load_balance_coeff = {moe_args.load_balance_coeff}: must be > 0 "
            "(0 in [mot] turns load balancing off)"
        )


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
    moe_modalities: list[int] = field(default_factory=list)
    """FFN weight sets that are a TorchTitan `MoE` (model/moe.py): modality ids when the FFN
    is untied; [0] (every token) when it is shared, as in the MoE-4x baseline. Set from
    `mot.moe_modalities` (names) or by the flavor."""
    moe_args: MoEArgs = field(default_factory=default_moe_args)
    """The shape of every MoE FFN (set from the `mot.moe_*` settings)."""

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
        self.check_moe("MoTModelArgs.moe_modalities")

    def check_moe(self, setting: str) -> None:
        """MoE sets must be FFN weight sets that exist, each named once."""
        n_sets = self.n_copies("ffn")
        bad = [s for s in self.moe_modalities if not 0 <= s < n_sets]
        if bad or len(set(self.moe_modalities)) != len(self.moe_modalities):
            raise ValueError(
                f"{setting} = {self.moe_modalities}: FFN weight sets are 0..{n_sets - 1} "
                f"({n_sets} set(s)), each at most once"
            )
        if self.moe_modalities:
            check_moe_args(self.moe_args, "MoTModelArgs.moe_args.")

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
        from .moe import moe_ffn_params

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
        active = shared + self.n_layers * sum(per_set.values())
        if self.moe_modalities:
            # MoE sets replace dense FFN sets; a token's FFN is its cheapest set's (see
            # MoTMoEFeedForward.inactive_params).
            moe_total, moe_active = moe_ffn_params(self.moe_args, self.dim, hidden)
            n_moe = len(self.moe_modalities)
            total += self.n_layers * n_moe * (moe_total - per_set["ffn"])
            dense_left = self.n_copies("ffn") > n_moe
            ffn_active = min(moe_active, per_set["ffn"]) if dense_left else moe_active
            active += self.n_layers * (ffn_active - per_set["ffn"])
        return total, active

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
        self._apply_moe_config(mot, job_config.model.flavor)
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

    def _apply_moe_config(self, mot, flavor: str) -> None:
        """`mot.moe_modalities` (names) -> FFN set ids, and the `mot.moe_*` shape.

        Empty `moe_modalities` keeps the flavor's MoE sets (the MoE-4x and hybrid flavors
        have them). A shared FFN (a dense flavor, or `ffn` not in `mot.untie`) is one set for
        all tokens: it can only be an MoE for every modality, never for some of them.
        """
        names = list(mot.moe_modalities)
        if names == [""]:  # `--mot.moe_modalities ""` arrives as [""] (see untie above)
            names = []
        unknown = [n for n in names if n not in mot.modalities]
        if unknown:
            raise ValueError(
                f"mot.moe_modalities = {names}: unknown modality(ies) {unknown}; "
                f"mot.modalities is {list(mot.modalities)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"mot.moe_modalities = {names}: a modality is listed twice")
        shared_ffn = self.n_copies("ffn") == 1
        if names:
            if shared_ffn and set(names) != set(mot.modalities):
                raise ValueError(
                    f"mot.moe_modalities = {names}: the FFN of flavor '{flavor}' is shared by "
                    f"all modalities (n_modalities={self.n_modalities}, mot.untie="
                    f"{self.untie}), so it can be an MoE for all of {list(mot.modalities)} or "
                    "none; untie ffn (an MoT flavor with ffn in mot.untie) for a per-modality MoE"
                )
            self.moe_modalities = [0] if shared_ffn else sorted(mot.modalities.index(n) for n in names)
        elif self.moe_modalities and shared_ffn and self.n_modalities > 1:
            raise ValueError(
                f"flavor '{flavor}' has an MoE FFN for modality ids {self.moe_modalities} but "
                f"mot.untie = {self.untie} shares the FFN across modalities: keep ffn in "
                "mot.untie, or set mot.moe_modalities to every modality"
            )
        self.moe_args = MoEArgs(
            num_experts=mot.moe_num_experts,
            num_shared_experts=mot.moe_num_shared_experts,
            top_k=mot.moe_top_k,
            score_func=mot.moe_score_func,
            use_grouped_mm=self.moe_args.use_grouped_mm,
            load_balance_coeff=mot.moe_load_balance_coeff or None,
        )
        if self.moe_modalities:
            from .moe import grouped_mm_available

            self.moe_args.use_grouped_mm = grouped_mm_available()
            check_moe_args(self.moe_args)
            moe_names = self.moe_modality_names(mot.modalities)
            frozen = [m for m in mot.frozen_modalities if m in moe_names]
            if frozen and self.moe_args.load_balance_coeff is not None:
                raise ValueError(
                    f"mot.frozen_modalities {frozen} have an MoE FFN whose router would keep "
                    "moving (the load-balancing expert bias is updated every step): set "
                    "mot.moe_load_balance_coeff = 0 to freeze them"
                )
        self.check_moe("mot.moe_modalities")

    def moe_modality_names(self, modalities: Sequence[str]) -> list[str]:
        """Names of the modalities whose tokens go through an MoE."""
        if self.n_copies("ffn") == 1:
            return list(modalities) if self.moe_modalities else []
        return [modalities[s] for s in self.moe_modalities]

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """All parameters, but ACTIVE flops: each token uses one weight set per component
        (of an MoE FFN: its top_k routed experts, the router gate and the shared experts).

        Counting all modality copies would inflate MFU n_modalities-fold; with this count
        MoT (whatever it unties) and its dense twin of the same shape report the same flops
        per token. A shared (one-child) module has no inactive copies. The Transfusion patch
        layers and timestep MLP run on every position (`model/diffusion.py`), so TorchTitan's
        6 * params count already holds them.
        """
        nparams, flops = get_dense_model_nparams_and_flops(
            self, model, 2 * (self.dim // self.n_heads), seq_len
        )
        from torchtitan_mot.model.moe import MoTMoEFeedForward
        from torchtitan_mot.model.routing import ModalityLinear, ModalityRMSNorm

        moe_ffns = [m for m in model.modules() if isinstance(m, MoTMoEFeedForward)]
        inside = {id(m) for ffn in moe_ffns for m in ffn.modules()}
        inactive = sum(ffn.inactive_params() for ffn in moe_ffns) + sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, (ModalityLinear, ModalityRMSNorm)) and id(m) not in inside
            for child in list(m)[1:]
            for p in child.parameters()
        )
        return nparams, flops - 6 * inactive

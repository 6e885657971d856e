"""The `[mot]` section of the job config and `load_job_config`, the one way any entry point
gets a job config.

TorchTitan merges this module's `JobConfig` into its own (`job.custom_config_module`), so
every field is settable from TOML (`[mot]`) and from the command line (`--mot.modalities
text image`). `load_job_config` then resolves the config once, before anything is built:

- `--job.config_file` is a path or a built-in config name (`debug_mot.toml`);
- a relative path of the config (`model.hf_assets_path`, `[training]`/`[validation]
  .dataset_path`) that is not in the working directory is looked up in the config file's
  repository, then in the configs and assets shipped with the package (`shipped_root`);
- a dataset path that looks local is never sent to the HuggingFace Hub;
- unset `[mot].modalities` / `codebook_sizes` come from the dataset's meta.json, set ones must
  agree with it;
- the unified vocabulary (`VocabLayout`) is computed once and attached to the config, where
  the model args and the loss read it (`resolved_vocab`).

What cannot work raises `ConfigError`: one line naming the file, field or flag to change.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager, JobConfig as TorchTitanJobConfig
from torchtitan.tools.logging import logger

from torchtitan_mot.compat.torchtitan_0_2_2 import config_file_values, without_assets_path_warning
from torchtitan_mot.data.meta import check_meta, looks_local, meta_latents, meta_modalities, missing_dataset
from torchtitan_mot.data.tokenizer import VocabLayout
from torchtitan_mot.model.args import LATENTS_ATTRIBUTE, UNTIE_COMPONENTS, VOCAB_ATTRIBUTE

_CONFIG_MODULE_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")
_CONFIG_FILE_FLAGS = ("--job.config_file", "--job.config-file")
PACKAGE = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A job config that cannot work. The message is one line naming the file, field or flag
    to change; `python -m torchtitan_mot.train` prints it as `error: <message>` and exits 2."""


@dataclass
class MoT:
    modalities: list[str] = field(default_factory=list)
    """Modality names in modality-id order. "text" must come first (id 0): it owns the text
    tokenizer's vocabulary and the special tokens. Must match the dataset's modalities.
    Empty: taken from `[training].dataset_path`'s meta.json (with `codebook_sizes`)."""

    codebook_sizes: list[int] = field(default_factory=list)
    """Codebook size of each NON-text modality, in the order of `modalities[1:]`. The unified
    vocabulary places each codebook (plus a begin and an end marker) after the text vocabulary.
    Empty: taken from the training dataset's meta.json, like `modalities`."""

    untie: list[str] = field(default_factory=lambda: list(UNTIE_COMPONENTS))
    """Which block components get one weight set per modality (the paper's ablations, e.g.
    `--mot.untie ffn` for modality-specific FFNs only): any of "attention" (wq/wk/wv/wo),
    "ffn" (w1/w2/w3) and "norms" (attention_norm, ffn_norm, QK-norms), each at most once.
    The rest is shared by all modalities, exactly the dense layer. The default (all three)
    is full MoT. An empty list is rejected for an MoT flavor (use the dense one); a dense
    flavor accepts only the default or []. Checkpoints of different settings do not load
    into each other (the mismatched keys are listed). See docs/untie.md."""

    loss_weights: list[float] = field(default_factory=list)
    """Loss weight per modality (same order as `modalities`), applied by the modality of the
    target token. Empty means 1.0 for every modality."""

    streaming: bool = False
    """Read the dataset as a HuggingFace streaming (iterable) dataset instead of map-style."""

    skip_bad_samples: bool = False
    """Skip (and count) malformed samples instead of stopping with an error."""

    frozen_modalities: list[str] = field(default_factory=list)
    """Modalities whose untied weights (those of the `untie` components) are not trained:
    they get `requires_grad=False` and are left out of the optimizer, so neither updates nor
    weight decay touch them (bitwise unchanged). Shared weights (embedding, final norm, head
    and any component not in `untie`) still train.
    Needs `python -m torchtitan_mot.train` (MoTTrainer passes these settings on)."""

    lr_multipliers: list[float] = field(default_factory=list)
    """Learning-rate multiplier per modality (same order as `modalities`) for its untied
    weights; shared weights (including components not in `untie`) use 1.0. Empty means 1.0 everywhere. The LR schedule scales
    every parameter group alike, so the ratios hold through warmup and decay."""

    nan_policy: str = "stop"
    """What a non-finite loss (or non-finite gradients) does: "stop" raises with the step number and
    per-modality losses before the optimizer step (so no poisoned weights are checkpointed);
    "skip" leaves weights and optimizer state untouched for that step and trains on."""

    # --- The Transfusion setting: continuous latents with a diffusion loss (docs/transfusion.md)

    diffusion_modalities: list[str] = field(default_factory=list)
    """Non-text modalities given as continuous latents (meta.json `latents`) and trained with
    the DDPM epsilon-prediction loss instead of next-token CE (the paper's Transfusion
    setting; e.g. `["image"]`). Empty: every modality is discrete tokens (Chameleon setting)."""

    diffusion_loss_weight: float = 5.0
    """lambda in `loss = CE per text token + lambda * MSE per image` (the paper's 5)."""

    diffusion_timesteps: int = 1000
    """T, the number of DDPM training timesteps; t is drawn per image from [0, T)."""

    diffusion_schedule: str = "cosine"
    """Noise schedule of the forward process; "cosine" (Nichol & Dhariwal) is the paper's."""

    diffusion_patch_size: int = 2
    """p: each p x p patch of a latent is one transformer position (the paper's 2)."""

    caption_first_prob: float = 0.8
    """Probability that a one-caption, one-image sample is ordered caption then image (the
    paper's 80%); otherwise image then caption. Drawn per sample, seeded, resumable."""

    diffusion_image_first_max_t: int = 0
    """Cap t at this value for an image that precedes its caption (the Transfusion paper's
    option, 500 there); 0 leaves t uncapped."""

    # --- MoT + MoE: TorchTitan's MoE FFN in chosen modalities (docs/moe.md) -----------------

    moe_modalities: list[str] = field(default_factory=list)
    """Modalities whose FFN is a mixture of experts (TorchTitan's `MoE`); the others keep
    their dense per-modality FFN. The paper's hybrid is `["text"]`. Empty: no MoE."""

    moe_num_experts: int = 4
    """Routed experts per MoE modality and layer (the paper's MoE-4x: 4)."""

    moe_top_k: int = 1
    """Experts each token is routed to (1: FLOP-matched to the dense FFN)."""

    moe_num_shared_experts: int = 0
    """Always-active shared experts next to the routed ones."""

    moe_score_func: str = "softmax"
    """Router score function: "softmax" or "sigmoid" (TorchTitan's `MoEArgs.score_func`)."""

    moe_load_balance_coeff: float = 1e-3
    """Step size of TorchTitan's auxiliary-loss-free load balancing (expert bias updated by
    an optimizer hook from the per-expert token counts); 0 turns it off."""


@dataclass
class JobConfig:
    mot: MoT = field(default_factory=MoT)


def shipped_root() -> Path:
    """Folder holding `train_configs/` and `assets/` (debug configs, demo tokenizer, demo data):
    `torchtitan_mot/_shipped` in an installed wheel (setup.py maps the repository's files
    there), the repository itself in a source checkout."""
    installed = PACKAGE / "_shipped"
    return installed if installed.is_dir() else PACKAGE.parent


def _candidates(value: str, config_file: str | None) -> list[Path]:
    """Where a config's relative path may be: the working directory, the config file's
    repository (the folder above its `train_configs/`) and folder, the shipped files."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    roots = [Path.cwd()]
    if config_file:
        folder = Path(config_file).absolute().parent
        roots += [folder.parent, folder]
    roots.append(shipped_root())
    return list(dict.fromkeys(root / path for root in roots))


def find_path(value: str, config_file: str | None, flag: str) -> Path:
    """The first existing candidate of `value` (see `_candidates`); ConfigError naming every
    place looked in when there is none."""
    candidates = _candidates(value, config_file)
    for path in candidates:
        if path.exists():
            return path
    raise ConfigError(f"{flag} {value}: not found (looked in {', '.join(map(str, candidates))})")


def find_config_file(name: str) -> Path:
    """`--job.config_file`: a path, or the name of a built-in config (`debug_mot.toml`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_root() / "train_configs"
    candidates = [path] if path.is_absolute() else [path.absolute(), shipped / path, shipped / path.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.name for p in shipped.glob("*.toml")))
    raise ConfigError(
        f"--job.config_file {name}: no such file (looked in "
        f"{', '.join(map(str, dict.fromkeys(candidates)))}); built-in configs: {names}"
    )


def _with_config_file(args: list[str]) -> list[str]:
    """`args` with the `--job.config_file` value replaced by the file `find_config_file` finds."""
    args = list(args)
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in _CONFIG_FILE_FLAGS:
            if eq:
                args[i] = f"{key}={find_config_file(value)}"
            elif i + 1 < len(args):
                args[i + 1] = str(find_config_file(args[i + 1]))
            break
    return args


class MoTConfigManager(ConfigManager):
    """ConfigManager whose `job.custom_config_module` defaults to this module and whose
    `--job.config_file` may name a built-in config. Parses only: `load_job_config` resolves."""

    def parse_args(self, args: list[str] | None = None) -> TorchTitanJobConfig:
        args = _with_config_file(sys.argv[1:] if args is None else args)
        given = any(a.split("=", 1)[0] in _CONFIG_MODULE_FLAGS for a in args)
        toml_values = config_file_values(self, args)
        if not given and not toml_values.get("job", {}).get("custom_config_module"):
            args += [_CONFIG_MODULE_FLAGS[0], __name__]
        with without_assets_path_warning():
            return super().parse_args(args)


def _resolve_datasets(job_config: TorchTitanJobConfig, read_data: bool) -> None:
    """Make local dataset paths absolute (found as `find_path` finds them); a missing one
    that the run reads is a ConfigError, never a Hub lookup."""
    config_file = job_config.job.config_file
    for section in ("training", "validation"):
        cfg = getattr(job_config, section)
        if not cfg.dataset_path:
            continue
        found = next((p for p in _candidates(cfg.dataset_path, config_file) if p.exists()), None)
        if found is not None:
            cfg.dataset_path = str(found)
        elif looks_local(cfg.dataset_path) and read_data and (
            section == "training" or job_config.validation.enable
        ):
            raise ConfigError(missing_dataset(cfg.dataset_path, f"--{section}.dataset_path"))


def _resolve_modalities(job_config: TorchTitanJobConfig, read_data: bool) -> None:
    """Unset `[mot].modalities` / `codebook_sizes` from the dataset's meta.json
    (`[training].dataset_path`, else `[validation].dataset_path`); set ones are checked
    against the meta.json of every dataset the run reads."""
    mot = job_config.mot
    paths = [job_config.training.dataset_path, job_config.validation.dataset_path]
    metas = [Path(p) / "meta.json" for p in paths if p and (Path(p) / "meta.json").is_file()]
    if mot.modalities:
        if not mot.codebook_sizes and len(mot.modalities) > 1:
            raise ConfigError(
                f"[mot].modalities is set to {mot.modalities} but [mot].codebook_sizes is not: "
                "set --mot.codebook_sizes (one per non-text modality)"
            )
        read = paths if job_config.validation.enable else paths[:1]
        for path in dict.fromkeys(read if read_data else []):
            meta = Path(path or "") / "meta.json"
            if not path or not meta.is_file():
                continue
            try:
                check_meta(meta, mot.modalities, mot.codebook_sizes)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return
    if mot.codebook_sizes:
        raise ConfigError(
            f"[mot].codebook_sizes is set to {mot.codebook_sizes} but [mot].modalities is not: "
            "set --mot.modalities too, or neither (both then come from meta.json)"
        )
    if not metas:
        raise ConfigError(
            "[mot].modalities is not set and neither [training].dataset_path "
            f"({paths[0]!r}) nor [validation].dataset_path ({paths[1]!r}) has a meta.json to "
            "take it from: set [mot].modalities and [mot].codebook_sizes"
        )
    try:
        mot.modalities, mot.codebook_sizes = meta_modalities(metas[0])
    except ValueError as e:
        raise ConfigError(str(e)) from None


PLAN_LATENT_SHAPE = (8, 32, 32)
"""Latent (C, H, W) assumed by a memory plan made without the dataset (`read_data=False`):
the paper's 256 px image through an 8x VAE with 8 channels. Only the patch layers' size
depends on it."""


def _resolve_diffusion(job_config: TorchTitanJobConfig, layout: VocabLayout, read_data: bool) -> None:
    """The diffusion modalities are exactly the latent ones (codebook size 0) and their
    latents cut into whole `diffusion_patch_size` patches; attaches their latent shapes."""
    mot = job_config.mot
    flag = "--mot.diffusion_modalities"
    for name in mot.diffusion_modalities:
        if name not in layout.modalities[1:]:
            raise ConfigError(f"{flag} names {name!r}, not a non-text modality of {list(layout.modalities)}")
        if layout.codebook_size(name) != 0:
            raise ConfigError(
                f"{flag} names {name!r}, but it has a codebook of {layout.codebook_size(name)} ids: a "
                "diffusion modality needs a dataset of latents (prepare --image-encoder pixels|vae) "
                "and codebook size 0"
            )
    for name in layout.latent_modalities:
        if name not in mot.diffusion_modalities:
            raise ConfigError(
                f"modality {name!r} is stored as continuous latents (codebook size 0) but {flag} "
                f"{mot.diffusion_modalities} does not list it: add it (the Transfusion setting)"
            )
    if not mot.diffusion_modalities:
        return
    if not 0.0 <= mot.caption_first_prob <= 1.0:
        raise ConfigError(f"--mot.caption_first_prob {mot.caption_first_prob}: must lie in [0, 1]")
    if not 0 <= mot.diffusion_image_first_max_t < mot.diffusion_timesteps:
        raise ConfigError(
            f"--mot.diffusion_image_first_max_t {mot.diffusion_image_first_max_t}: must lie in "
            f"[0, mot.diffusion_timesteps = {mot.diffusion_timesteps}) (0: no cap)"
        )
    p = mot.diffusion_patch_size
    if p < 1:
        raise ConfigError(f"--mot.diffusion_patch_size {p}: must be at least 1")
    paths = [job_config.training.dataset_path]
    if job_config.validation.enable:
        paths.append(job_config.validation.dataset_path)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in dict.fromkeys(q for q in paths if q):
        meta = Path(path) / "meta.json"
        if not meta.is_file():
            if read_data and looks_local(path):
                raise ConfigError(f"{flag} needs a local dataset with meta.json (its latents' shapes); {meta} is missing")
            continue
        try:
            latents = meta_latents(meta)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in mot.diffusion_modalities:
            shape = tuple(latents[name]["shape"])
            if shape[1] % p or shape[2] % p:
                raise ConfigError(
                    f"--mot.diffusion_patch_size {p} does not divide the {name!r} latents of {meta} "
                    f"(shape [C, H, W] = {list(shape)}): choose a patch size dividing H and W"
                )
            if shapes.setdefault(name, shape) != shape:
                raise ConfigError(
                    f"{meta}: {name!r} latents have shape {list(shape)}, the training dataset's "
                    f"{list(shapes[name])}: --validation.dataset_path must hold latents of the same shape"
                )
    if not read_data:
        for name in mot.diffusion_modalities:
            shapes.setdefault(name, PLAN_LATENT_SHAPE)
    cp = job_config.parallelism.context_parallel_degree
    if cp > 1:
        raise ConfigError(
            f"--parallelism.context_parallel_degree = {cp} with mot.diffusion_modalities "
            f"{mot.diffusion_modalities}: not supported in the Transfusion setting (the patches, "
            "timesteps, noise and image ids are not sharded with the tokens, and the "
            "intra-image mask has no tested context-parallel path); use FSDP / TP / PP"
        )
    setattr(mot, LATENTS_ATTRIBUTE, shapes)


def _text_vocab_size(job_config: TorchTitanJobConfig, fallback: int | None) -> int:
    """Text ids of `model.hf_assets_path` (made absolute), or `fallback` where it is not here."""
    value = job_config.model.hf_assets_path
    if not value:
        if fallback is not None:
            return fallback
        raise ConfigError("--model.hf_assets_path is not set: name the text tokenizer's folder")
    try:
        path = find_path(value, job_config.job.config_file, "--model.hf_assets_path")
    except ConfigError:
        if fallback is not None:
            return fallback
        raise
    job_config.model.hf_assets_path = str(path)
    try:
        return HuggingFaceTokenizer(str(path)).get_vocab_size()
    except Exception as e:  # tokenizers/json raise many types; any of them means "not a tokenizer"
        raise ConfigError(f"--model.hf_assets_path {path}: not a HuggingFace tokenizer folder ({e})") from None


def _report_text_tokenizer(job_config: TorchTitanJobConfig, layout: VocabLayout) -> None:
    """Say which tokenizer encodes the text; warn when the demo tokenizer encodes user data."""
    tokenizer = Path(job_config.model.hf_assets_path).resolve()
    logger.info(
        f"text tokenizer: {tokenizer} ({layout.text_vocab_size:,} text ids; unified "
        f"vocabulary {layout.vocab_size:,} ids)"
    )
    demo = (shipped_root() / "assets").resolve()
    dataset = job_config.training.dataset_path
    if tokenizer == demo / "tokenizer" and dataset and not (
        Path(dataset).resolve().is_relative_to(demo / "demo")
    ):
        logger.warning(
            f"{dataset} is encoded with the bundled demo text tokenizer ({tokenizer}, "
            f"{layout.text_vocab_size:,} ids fitted to the demo captions): pass "
            "--model.hf_assets_path with the tokenizer folder meant for your text "
            "(e.g. a Llama 3 tokenizer)"
        )


def resolve_job_config(
    job_config: TorchTitanJobConfig, *, read_data: bool = True, text_vocab_fallback: int | None = None
) -> VocabLayout:
    """Resolve paths, `[mot]` and the unified vocabulary of a parsed config, once (see the
    module docstring); returns the vocabulary, also attached to the config.

    `read_data=False` (a memory plan) skips the checks of data the run would read;
    `text_vocab_fallback` is the text vocabulary size when the tokenizer is not on this machine.
    """
    if getattr(job_config, "mot", None) is None:
        raise ConfigError(
            "the [mot] config section is missing: set job.custom_config_module = "
            "'torchtitan_mot.config' (load_job_config does this unless told otherwise)"
        )
    resolved = getattr(job_config.mot, VOCAB_ATTRIBUTE, None)
    if resolved is not None:
        return resolved
    _resolve_datasets(job_config, read_data)
    _resolve_modalities(job_config, read_data)
    text_vocab = _text_vocab_size(job_config, text_vocab_fallback)
    mot = job_config.mot
    try:
        layout = VocabLayout(text_vocab, tuple(mot.modalities), tuple(mot.codebook_sizes))
    except ValueError as e:
        raise ConfigError(f"[mot].modalities {mot.modalities} / codebook_sizes {mot.codebook_sizes}: {e}") from None
    _resolve_diffusion(job_config, layout, read_data)
    if read_data:
        _report_text_tokenizer(job_config, layout)
    setattr(job_config.mot, VOCAB_ATTRIBUTE, layout)
    return layout


def load_job_config(
    argv: list[str] | None = None, *, read_data: bool = True, text_vocab_fallback: int | None = None
) -> TorchTitanJobConfig:
    """The one way an entry point gets a job config: TOML + command-line overrides, `[mot]`
    registered, resolved by `resolve_job_config` (whose keywords these are)."""
    job_config = MoTConfigManager().parse_args(argv)
    resolve_job_config(job_config, read_data=read_data, text_vocab_fallback=text_vocab_fallback)
    return job_config

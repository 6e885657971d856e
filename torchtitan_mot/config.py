"""The `[mot]` section of the job config (loaded through `job.custom_config_module`).

TorchTitan merges this `JobConfig` into its own, so every field is settable from TOML
(`[mot]`) and from the command line (`--mot.modalities text image`). `MoTConfigManager`
(what `python -m torchtitan_mot.train` parses with) loads this module by default.
"""

import sys
from dataclasses import dataclass, field

from torchtitan.config import ConfigManager, JobConfig as TorchTitanJobConfig

from torchtitan_mot.compat.torchtitan_0_2_2 import config_file_values
from torchtitan_mot.data.dataset import fill_modalities_from_meta

_CONFIG_MODULE_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")


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

    untie: list[str] = field(default_factory=lambda: ["attention", "ffn", "norms"])
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


@dataclass
class JobConfig:
    mot: MoT = field(default_factory=MoT)


class MoTConfigManager(ConfigManager):
    """ConfigManager whose `job.custom_config_module` defaults to this module and whose unset
    `[mot].modalities` / `codebook_sizes` come from the dataset's meta.json."""

    def parse_args(self, args: list[str] | None = None) -> TorchTitanJobConfig:
        args = list(sys.argv[1:] if args is None else args)
        given = any(a.split("=", 1)[0] in _CONFIG_MODULE_FLAGS for a in args)
        toml_values = config_file_values(self, args)
        if not given and not toml_values.get("job", {}).get("custom_config_module"):
            args += [_CONFIG_MODULE_FLAGS[0], __name__]
        job_config = super().parse_args(args)
        if hasattr(job_config, "mot"):
            # Before the trainer copies [mot] anywhere (e.g. into the optimizer config).
            fill_modalities_from_meta(job_config)
        return job_config


def load_job_config(argv: list[str] | None = None) -> TorchTitanJobConfig:
    """The one way an entry point gets a job config: TOML + command-line overrides, `[mot]`
    registered, unset modalities/codebook sizes filled from the dataset's meta.json."""
    return MoTConfigManager().parse_args(argv)

"""torchtitan-mot: Mixture-of-Transformers pretraining on TorchTitan.

Importing this package registers the TrainSpec "mot" (`--model.name mot`).
"""

import copy
import dataclasses

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.config import JobConfig
from torchtitan.protocols.train_spec import register_train_spec, TrainSpec

from .compat.torchtitan_0_2_2 import count_experts_on_cpu
from .data.dataloader import build_mot_dataloader
from .data.tokenizer import build_mot_tokenizer, VocabLayout
from .infra.parallelize import parallelize_mot
from .infra.pipeline import pipeline_mot
from .model import MoTModelArgs, MoTTransformer
from .model.args import default_moe_args
from .model.state_dict_adapter import MoTStateDictAdapter
from .trainer.loss import build_mot_loss
from .trainer.metrics import build_mot_metrics_processor
from .trainer.optimizer import build_mot_optimizers
from .trainer.validate import build_mot_validator

count_experts_on_cpu()

_debug = dict(dim=256, n_layers=6, n_heads=16, rope_theta=500000)
_8b = dict(
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
    multiple_of=1024, rope_theta=500000,
)
_70b = dict(
    dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
    multiple_of=4096, rope_theta=500000,
)
_block_causal = dict(attn_mask_type="block_causal")
# The paper's smallest model (arXiv 2411.04996, Table 1; 37M with its 65k-id vocabulary).
_37m = dict(dim=256, n_layers=4, n_heads=8, rope_theta=500000)
# The Transfusion setting's sizes (MoT paper §3.4): dim / layers / heads.
_transfusion = {
    "163M": dict(dim=768, n_layers=16, n_heads=12),
    "760M": dict(dim=1536, n_layers=24, n_heads=24),
    "1.4B": dict(dim=2048, n_layers=24, n_heads=16),
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
}
# The paper's 443M and 7B shapes (Table 1).
_443m = dict(dim=1024, n_layers=24, n_heads=16, rope_theta=500000)
_7b = dict(dim=4096, n_layers=32, n_heads=32, rope_theta=500000)
# MoE-4x: dense (shared) attention and norms, one MoE FFN for all tokens (model/moe.py);
# the hybrid: MoT with only the text FFN (modality 0) an MoE. Shapes from [mot] moe_*.
_moe4x = dict(n_modalities=1, moe_modalities=[0])
_hybrid = dict(moe_modalities=[0])

mot_args: dict[str, MoTModelArgs] = {
    "debugmodel": MoTModelArgs(**_debug, n_modalities=2),
    "debugmodel_flex_attn": MoTModelArgs(**_debug, n_modalities=2, attn_type="flex", **_block_causal),
    "debugmodel_varlen_attn": MoTModelArgs(**_debug, n_modalities=2, attn_type="varlen", **_block_causal),
    "debugmodel_3modality": MoTModelArgs(**_debug, n_modalities=3),
    "debugmodel_dense": MoTModelArgs(**_debug, n_modalities=1),
    "37M_2modality": MoTModelArgs(**_37m, n_modalities=2),
    "37M_3modality": MoTModelArgs(**_37m, n_modalities=3),
    "37M_dense": MoTModelArgs(**_37m, n_modalities=1),
    "8B_2modality": MoTModelArgs(**_8b, n_modalities=2),
    "8B_3modality": MoTModelArgs(**_8b, n_modalities=3),
    "70B_2modality": MoTModelArgs(**_70b, n_modalities=2),
    "70B_3modality": MoTModelArgs(**_70b, n_modalities=3),
    "debugmodel_transfusion": MoTModelArgs(**_debug, n_modalities=2, diffusion=True),
    "debugmodel_transfusion_dense": MoTModelArgs(**_debug, n_modalities=1, diffusion=True),
    "debugmodel_transfusion_flex": MoTModelArgs(
        **_debug, n_modalities=2, diffusion=True, attn_type="flex", **_block_causal
    ),
    "debugmodel_moe4x": MoTModelArgs(**_debug, **_moe4x),
    "debugmodel_hybrid": MoTModelArgs(**_debug, n_modalities=2, **_hybrid),
    "37M_moe4x": MoTModelArgs(**_37m, **_moe4x),
    "37M_hybrid": MoTModelArgs(**_37m, n_modalities=2, **_hybrid),
    "443M_2modality": MoTModelArgs(**_443m, n_modalities=2),
    "443M_dense": MoTModelArgs(**_443m, n_modalities=1),
    "443M_moe4x": MoTModelArgs(**_443m, **_moe4x),
    "7B_2modality": MoTModelArgs(**_7b, n_modalities=2),
    "7B_dense": MoTModelArgs(**_7b, n_modalities=1),
    "7B_moe4x": MoTModelArgs(**_7b, **_moe4x),
    "8B_hybrid": MoTModelArgs(**_8b, n_modalities=2, **_hybrid),
    "70B_hybrid": MoTModelArgs(**_70b, n_modalities=2, **_hybrid),
}
for _size, _shape in _transfusion.items():
    for _suffix, _n in (("", 2), ("_dense", 1)):
        mot_args[f"transfusion_{_size}{_suffix}"] = MoTModelArgs(
            **_shape, rope_theta=500000, n_modalities=_n, diffusion=True
        )


def dense_twin_flavor(flavor: str) -> str:
    """The registered flavor that is `flavor` with one modality: the baseline a comparison
    must train (same shape, same code; an MoE flavor's twin is the dense FFN model)."""
    if flavor not in mot_args:
        raise ValueError(f"unknown MoT flavor '{flavor}'; known: {sorted(mot_args)}")
    twin = dataclasses.replace(
        mot_args[flavor], n_modalities=1, moe_modalities=[], moe_args=default_moe_args()
    )
    for name, args in mot_args.items():
        if args == twin:
            return name
    raise ValueError(f"flavor '{flavor}' has no registered dense twin (n_modalities=1)")


def moe4x_flavor(flavor: str) -> str:
    """The registered MoE-4x baseline of `flavor`'s shape: shared attention and norms, one
    MoE FFN for every token (the paper's FLOP-matched MoE comparison, §3.2.1)."""
    dense = mot_args[dense_twin_flavor(flavor)]
    moe4x = dataclasses.replace(dense, moe_modalities=[0])
    for name, args in mot_args.items():
        if args == moe4x:
            return name
    raise ValueError(f"flavor '{flavor}' has no registered MoE-4x baseline (e.g. debugmodel_moe4x)")


def build_model_args(job_config: JobConfig, vocab: VocabLayout | None = None) -> MoTModelArgs:
    """The args of the config's flavor with the config applied as the trainer applies it
    (`training.seq_len`, `[mot]` modalities and untie, the unified vocabulary of the config's
    tokenizer, or of `vocab` where that tokenizer is not on this machine).

    A copy: the registered flavor stays as registered, so one process can build the args
    of several configs (TorchTitan's trainer updates the registered entry in place).
    """
    flavor = job_config.model.flavor
    if flavor not in mot_args:
        raise ValueError(f"model.flavor {flavor!r} is not an MoT flavor; known: {sorted(mot_args)}")
    args = copy.deepcopy(mot_args[flavor])
    args.update_from_config(job_config, vocab_size=vocab.vocab_size if vocab else None)
    return args


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=MoTTransformer,
        model_args=mot_args,
        parallelize_fn=parallelize_mot,
        pipelining_fn=pipeline_mot,
        build_optimizers_fn=build_mot_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_mot_dataloader,
        build_tokenizer_fn=build_mot_tokenizer,
        build_loss_fn=build_mot_loss,
        build_metrics_processor_fn=build_mot_metrics_processor,
        build_validator_fn=build_mot_validator,
        state_dict_adapter=MoTStateDictAdapter,
    )


register_train_spec("mot", get_train_spec())

"""Activation checkpointing of MoT blocks: TorchTitan's `apply_ac` with MoT's op-level policy.

Full and layer-selective AC are TorchTitan's own. Op-selective AC saves the outputs of the
ops in a save list; Llama3's list saves every other `aten.mm` of a block (wq, wv, w1, w2
saved; wk, wo, w3 recomputed) by counting mm calls. An MoT projection is one custom op
over all modalities, which that count does not see, so this policy chooses per projection:
the model offers the same routed matmul as two ops (`mot::routed_mm`, whose outputs are in
the save list, and `mot::routed_mm_recompute`, whose outputs are not), and the projections
Llama3 recomputes are switched to the second (`ModalityLinear.recompute`).
"""

import torch
from torchtitan.config import JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

from torchtitan_mot.model.model import MoTTransformer
from torchtitan_mot.model.routing import ModalityLinear

# The per-modality projections whose outputs op-selective AC recomputes (Llama3's rate), by
# their own name (an MoE block's dense FFN sits one level deeper than a dense block's).
RECOMPUTED_PROJECTIONS = ("wk", "wo", "w3")

# Llama3's save list plus the routed matmul that is saved (SAC sees a custom op as one op).
OP_SAC_SAVE_LIST = _op_sac_save_list | {torch.ops.mot.routed_mm.default}


def apply_mot_ac(model: MoTTransformer, job_config: JobConfig, model_compile_enabled: bool) -> None:
    """Wrap the blocks as `job_config.activation_checkpoint` asks, with MoT's save list."""
    for block in model.layers.values():
        recomputed = [
            m for name, m in block.named_modules()
            if isinstance(m, ModalityLinear) and name.rsplit(".", 1)[-1] in RECOMPUTED_PROJECTIONS
        ]
        assert recomputed, f"no {RECOMPUTED_PROJECTIONS} projection in {type(block).__name__}"
        for projection in recomputed:
            projection.recompute = True
    apply_ac(
        model,
        job_config.activation_checkpoint,
        model_compile_enabled=model_compile_enabled,
        op_sac_save_list=OP_SAC_SAVE_LIST,
        base_folder=job_config.job.dump_folder,
    )

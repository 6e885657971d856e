"""The checkpoint check: a checkpoint that does not fit the model is refused, naming every misfit.

At start-up `MoTTrainer` runs `check_start_checkpoint`: the checkpoint TorchTitan is about to
load is compared with the model before anything is loaded.
"""

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchtitan.components.checkpoint import CheckpointManager, ModelWrapper
from torchtitan.config import JobConfig

from torchtitan_mot.compat.torchtitan_0_2_2 import checkpoint_id_for_step

# Model entries of a DCP checkpoint (the trainer flattens the model state into the top level).
_MODEL_KEY = re.compile(r"^(tok_embeddings|norm|output|diffusion|layers\.\d+)\.")


def check_checkpoint_matches(
    checkpoint_id: str, model_state: Mapping[str, Any], stage_only: bool = False
) -> None:
    """Compare a DCP checkpoint's model entries with the model before anything is loaded.

    DCP itself stops at the first missing key (in no fixed order) and never mentions keys
    the model lacks; a checkpoint of another flavor or modality count deserves the full
    list: missing keys, unexpected keys and shape mismatches (global shapes, so sharded
    models compare correctly). Raises `CheckpointMismatchError`; reads only `.metadata`.
    `stage_only`: the model is one pipeline stage, so the other stages' keys are expected.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        k: tuple(m.size)
        for k, m in FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and _MODEL_KEY.match(k)
    }
    want = {k: tuple(v.shape) for k, v in model_state.items()}
    missing = sorted(set(want) - set(saved))
    unexpected = [] if stage_only else sorted(set(saved) - set(want))
    shapes = [f"{k}: model {list(want[k])} vs checkpoint {list(saved[k])}"
              for k in sorted(set(want) & set(saved)) if want[k] != saved[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model keys missing from the checkpoint: {_head(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys the model does not have: {_head(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_head(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_id} does not fit this model (another flavor, modality "
            "count, mot.untie setting, MoE shape (mot.moe_modalities, mot.moe_num_experts, "
            "mot.moe_num_shared_experts) or vocabulary?); nothing was loaded: "
            + " | ".join(problems)
        )


def _head(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


class CheckpointMismatchError(ValueError):
    """A checkpoint's model entries do not match the model being trained."""


def checkpoint_to_load(checkpointer: CheckpointManager, job_config: JobConfig) -> str | None:
    """The DCP checkpoint `CheckpointManager.load()` will read at start-up, or None.

    Mirrors its choice: the latest complete `step-N` (or `checkpoint.load_step`) of the
    checkpoint folder if that folder exists, else `checkpoint.initial_load_path`. HF
    safetensors loads are left to the state dict adapter.
    """
    if not getattr(checkpointer, "enable", False):
        return None
    if os.path.exists(checkpointer.folder):
        return checkpoint_id_for_step(checkpointer, job_config.checkpoint.load_step)
    path = job_config.checkpoint.initial_load_path
    if path and not job_config.checkpoint.initial_load_in_hf and os.path.isfile(os.path.join(path, ".metadata")):
        return path
    return None


def check_start_checkpoint(
    checkpointer: CheckpointManager,
    job_config: JobConfig,
    model_parts: list[nn.Module],
    stage_only: bool,
) -> None:
    """`check_checkpoint_matches` for the checkpoint the trainer will load at start-up, if any."""
    checkpoint_id = checkpoint_to_load(checkpointer, job_config)
    if checkpoint_id is not None:
        # Canonical FQNs (no FSDP / compile / activation-checkpoint wrappers), as saved.
        check_checkpoint_matches(
            checkpoint_id, ModelWrapper(model_parts).state_dict(), stage_only=stage_only
        )

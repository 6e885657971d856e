"""Trainer-side guards: a non-finite loss never reaches the weights or a checkpoint.

TorchTitan's `train_step` runs forward/backward for every microbatch, clips gradients, steps
the optimizer, then (in `train`) may save a checkpoint. A NaN/inf loss would be stepped into
the weights and the optimizer moments and then saved. `NonFiniteLossGuard` sees each
microbatch loss (`record`, no host sync) and is asked by the optimizer container right before
the step (`should_step`, one small all-reduce so every rank takes the same decision: with
FSDP a rank that skipped while another stepped would diverge or hang). With
`mot.nan_policy = "stop"` it raises `NonFiniteLossError` naming the step and this rank's
per-modality losses; the exception leaves `train_step` before the optimizer step, so the
weights stay finite and TorchTitan's `main` closes the trainer without saving. With
`"skip"` the step is skipped (weights and optimizer state untouched; the LR schedule and
the data position move on) and training continues.

`check_checkpoint_matches` compares the checkpoint about to be loaded with the model at
start-up and lists every missing / unexpected key and shape mismatch (DCP alone names only
the first missing key). The gradients are checked through the total norm TorchTitan computes for clipping (see
`NonFiniteLossGuard.record_grad_norm`). `ReliabilityMixin` wires both into a `Trainer` subclass:
`class MoTTrainer(ReliabilityMixin, torchtitan.train.Trainer)`.
"""

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from torchtitan_mot.compat import clipped_grad_norm_to

NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def per_modality_losses(
    sums: torch.Tensor, counts: torch.Tensor, modalities: Sequence[str]
) -> dict[str, float]:
    """Mean cross-entropy per modality; modalities without target tokens are left out."""
    return {
        name: float(s / c)
        for name, s, c in zip(modalities, sums.tolist(), counts.tolist())
        if c > 0
    }


class NonFiniteLossGuard:
    """Collects one step's microbatch losses and decides whether the optimizer may step."""

    def __init__(
        self,
        policy: str,
        modalities: Sequence[str],
        loss_fn: Any = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if policy not in NAN_POLICIES:
            raise ValueError(f"mot.nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
        self.policy = policy
        self.modalities = list(modalities)
        self.loss_fn = loss_fn
        self.group = group
        self.skipped_steps: list[int] = []
        self._bad: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None

    def record(self, loss: torch.Tensor) -> None:
        """Remember a microbatch loss (device tensor; no host sync here)."""
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).any()
        self._bad = bad if self._bad is None else self._bad | bad
        self._losses.append(loss)

    def record_grad_norm(self, total_norm: torch.Tensor) -> None:
        """Remember the step's total gradient norm, as computed for clipping.

        TorchTitan's `clip_grad_norm_` reduces it over every mesh the gradients are sharded
        on (FSDP / TP through DTensor, pipeline stages explicitly), so it is non-finite on
        every rank as soon as one gradient element anywhere is: no second pass over the
        gradients is needed to catch an overflow in backward.
        """
        self._grad_norm = total_norm.detach()

    def should_step(self, step: int) -> bool:
        """True if every rank's losses and the step's gradients are finite; resets.

        A finite loss can still give non-finite gradients (an overflow in backward, or
        weights already at the edge of float range); the optimizer would then write NaN
        into the weights. Must be called on every rank once per step: it is a collective
        when distributed (one 2-element all-reduce) and reads one value to the host.
        """
        losses, bad, grad_norm = self._losses, self._bad, self._grad_norm
        self._bad, self._losses, self._grad_norm = None, [], None
        flags = [
            torch.tensor(False) if bad is None else bad,
            torch.tensor(False) if grad_norm is None else ~torch.isfinite(grad_norm),
        ]
        device = next((f.device for f in flags if f.device.type != "cpu"), flags[0].device)
        flag = torch.stack([f.to(device) for f in flags]).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        loss_bad, grad_bad = flag.tolist()
        if not (loss_bad or grad_bad):
            return True
        report = self.report(step, losses)
        if not loss_bad:
            report += " (the loss was finite, the gradients were not)"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"{report}; stopped before the optimizer step, nothing was saved for this step "
                "(set mot.nan_policy = \"skip\" to skip such steps instead)"
            )
        self.skipped_steps.append(step)
        logger.warning(f"{report}; step skipped (weights and optimizer state unchanged)")
        return False

    def report(self, step: int, losses: Sequence[torch.Tensor]) -> str:
        """Step number, this rank's microbatch losses and per-modality mean losses."""
        values = [round(float(v), 6) for v in torch.stack([l.float().reshape(()) for l in losses])] if losses else []
        text = f"non-finite loss or gradients at step {step}: microbatch losses on this rank {values}"
        if self.loss_fn is not None and hasattr(self.loss_fn, "pop_modality_stats"):
            sums, counts = self.loss_fn.pop_modality_stats()
            text += f", per-modality loss {per_modality_losses(sums, counts, self.modalities)}"
        return text


# Model entries of a DCP checkpoint (the trainer flattens the model state into the top level).
_MODEL_KEY = re.compile(r"^(tok_embeddings|norm|output|layers\.\d+)\.")


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
            "count, mot.untie setting or vocabulary?); nothing was loaded: " + " | ".join(problems)
        )


def _head(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


class CheckpointMismatchError(ValueError):
    """A checkpoint's model entries do not match the model being trained."""


def checkpoint_to_load(checkpointer: Any, job_config: JobConfig) -> str | None:
    """The DCP checkpoint `CheckpointManager.load()` will read at start-up, or None.

    Mirrors its choice: the latest complete `step-N` (or `checkpoint.load_step`) of the
    checkpoint folder if that folder exists, else `checkpoint.initial_load_path`. HF
    safetensors loads are left to the state dict adapter.
    """
    if not getattr(checkpointer, "enable", False):
        return None
    if os.path.exists(checkpointer.folder):
        step = job_config.checkpoint.load_step
        step = checkpointer._find_load_step() if step == -1 else step
        return None if step == -1 else checkpointer._create_checkpoint_id(step)
    path = job_config.checkpoint.initial_load_path
    if path and not job_config.checkpoint.initial_load_in_hf and os.path.isfile(os.path.join(path, ".metadata")):
        return path
    return None


class ReliabilityMixin:
    """Trainer mixin: per-modality optimizer settings, checkpoint check, non-finite loss guard.

    Put it before `torchtitan.train.Trainer` in the bases. Before the parent constructor it
    lets `job_config.optimizer` carry the `[mot]` optimizer settings (the parent builds the
    optimizer); afterwards it checks the checkpoint that will be loaded against the model
    (`check_checkpoint_matches`), hooks a `NonFiniteLossGuard` into the optimizer step and
    records every loss returned by `forward_backward_step`.
    """

    def __init__(self, job_config: JobConfig) -> None:
        from torchtitan.components.checkpoint import ModelWrapper

        from torchtitan_mot.optimizer import MoTOptimizersContainer, use_modality_optimizer_settings

        use_modality_optimizer_settings(job_config)
        super().__init__(job_config)  # type: ignore[call-arg]
        self.nonfinite_guard = NonFiniteLossGuard(
            job_config.mot.nan_policy, job_config.mot.modalities, self.loss_fn
        )
        if not isinstance(self.optimizers, MoTOptimizersContainer):
            raise ValueError(
                "the non-finite loss guard needs torchtitan_mot's optimizer container "
                f"(build_mot_optimizers); got {type(self.optimizers).__name__} "
                "(optimizer.early_step_in_backward and fault tolerance are not supported)"
            )
        checkpoint_id = checkpoint_to_load(self.checkpointer, job_config)
        if checkpoint_id is not None:
            # Canonical FQNs (no FSDP / compile / activation-checkpoint wrappers), as saved.
            check_checkpoint_matches(
                checkpoint_id,
                ModelWrapper(self.model_parts).state_dict(),
                stage_only=self.parallel_dims.pp_enabled,
            )
        self.optimizers.step_guard = lambda: self.nonfinite_guard.should_step(self.step)

    def forward_backward_step(self, **kwargs: Any) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)  # type: ignore[misc]
        self.nonfinite_guard.record(loss)
        return loss

    def train_step(self, data_iterator: Any) -> None:
        with clipped_grad_norm_to(self.nonfinite_guard.record_grad_norm):
            super().train_step(data_iterator)  # type: ignore[misc]

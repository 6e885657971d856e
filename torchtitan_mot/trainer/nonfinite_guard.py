"""The non-finite loss guard: a NaN/inf loss or gradient never reaches the weights or a checkpoint.

TorchTitan's `train_step` runs forward/backward for every microbatch, clips gradients, steps
the optimizer, then (in `train`) may save a checkpoint. A NaN/inf loss would be stepped into
the weights and the optimizer moments and then saved. The guard takes part in each step at
three points, all visible here:

1. `MoTTrainer.train_step` runs TorchTitan's step inside `guard.guarding(step)`, which also
   hands the total gradient norm TorchTitan computes for clipping to `record_grad_norm`
   (0.2.2 keeps it to itself until logging: `compat.clipped_grad_norm_to`);
2. `MoTTrainer.forward_backward_step` hands it every microbatch loss (`record`, no host sync);
3. the optimizer container it was built with (`MoTOptimizersContainer(step_guard=...)`) asks
   `should_step()` right before stepping: one small all-reduce, so every rank takes the same
   decision (with FSDP a rank that skipped while another stepped would diverge or hang).

With `mot.nan_policy = "stop"` it raises `NonFiniteLossError` naming the step and this rank's
per-modality losses; the exception leaves `train_step` before the optimizer step, so the
weights stay finite and TorchTitan's `main` closes the trainer without saving. With `"skip"`
the step is skipped (weights and optimizer state untouched; the LR schedule and the data
position move on) and training continues.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

from torchtitan_mot.compat.torchtitan_0_2_2 import clipped_grad_norm_to
from torchtitan_mot.trainer.loss import ModalityLossStats

NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard:
    """Collects one step's microbatch losses and gradient norm; decides whether the optimizer
    may step. `loss_stats` (the trainer's) name the per-modality losses in its report."""

    def __init__(
        self,
        policy: str,
        loss_stats: ModalityLossStats | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if policy not in NAN_POLICIES:
            raise ValueError(f"mot.nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
        self.policy = policy
        self.loss_stats = loss_stats
        self.group = group
        self.step = 0
        self.skipped_steps: list[int] = []
        self._bad: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None

    @contextmanager
    def guarding(self, step: int) -> Iterator[None]:
        """Training step `step`: its clipped gradient norm is recorded as it is computed."""
        self.step = step
        with clipped_grad_norm_to(self.record_grad_norm):
            yield

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

    def should_step(self) -> bool:
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
        report = self.report(losses)
        if not loss_bad:
            report += " (the loss was finite, the gradients were not)"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"{report}; stopped before the optimizer step, nothing was saved for this step "
                "(set mot.nan_policy = \"skip\" to skip such steps instead)"
            )
        self.skipped_steps.append(self.step)
        logger.warning(f"{report}; step skipped (weights and optimizer state unchanged)")
        return False

    def report(self, losses: Sequence[torch.Tensor]) -> str:
        """Step number, this rank's microbatch losses and per-modality mean losses."""
        values = [round(float(v), 6) for v in torch.stack([l.float().reshape(()) for l in losses])] if losses else []
        text = f"non-finite loss or gradients at step {self.step}: microbatch losses on this rank {values}"
        if self.loss_stats is not None:
            sums, counts = self.loss_stats.pop()
            text += f", per-modality loss {self.loss_stats.means(sums.cpu(), counts.cpu())}"
        return text

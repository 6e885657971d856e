"""Cross-entropy weighted and reported per modality of the target token."""

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import JobConfig
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from torchtitan_mot.config import resolve_job_config


def training_device() -> torch.device:
    """The device TorchTitan's trainer trains on (`Trainer.device`): where every tensor
    that reaches a collective must live (NCCL rejects host tensors; gloo hides that)."""
    return torch.device(utils.device_type, int(os.environ.get("LOCAL_RANK", 0)))


def modality_cross_entropy(
    pred: torch.Tensor,
    labels: torch.Tensor,
    token_modality: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted CE summed over tokens, per-modality CE sums, per-modality token counts).

    A target's modality is read off its id (the unified vocabulary assigns every id to one
    modality), so no extra tensor has to travel with the labels through pipeline stages.
    """
    ce = F.cross_entropy(
        pred.flatten(0, 1).float(),
        labels.flatten(0, 1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    if isinstance(ce, DTensor):
        # Loss parallel (vocab-sharded logits) yields the per-token CE replicated on every
        # tensor-parallel rank: the local tensor is the full one, no communication needed.
        ce = ce.to_local()
    flat = labels.flatten(0, 1)
    valid = (flat != IGNORE_INDEX).to(ce.dtype)
    modality = token_modality.index_select(0, flat.clamp(min=0))
    n = weights.numel()
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, modality, ce * valid)
    counts = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, modality, valid)
    return (ce * weights.index_select(0, modality)).sum(), sums, counts


class ModalityLossStats:
    """Per-modality CE sums and token counts of this rank, one record per loss call.

    The trainer owns one and hands it to the loss (which records every call), the metrics
    processor (which pops it at each log step) and the non-finite guard (which names the
    per-modality losses when it stops a step); the validator keeps its own, so validation
    tokens never reach the training log. Everything lives on `device`, also on a pipeline
    stage that never computes the loss, because the popped stats are all-reduced.
    """

    def __init__(self, modalities: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.modalities = list(modalities)
        self.device = torch.device(device)
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Record one loss call's per-modality CE sums and token counts."""
        self._records.append((sums.detach(), counts.detach()))

    @property
    def n_records(self) -> int:
        """Loss calls recorded since the last pop."""
        return len(self._records)

    def discard(self, start: int, count: int) -> None:
        """Forget `count` records from index `start` (calls that were not training steps)."""
        del self._records[start : start + count]

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality CE sums and token counts recorded on this rank since the last pop."""
        n = len(self.modalities)
        sums = torch.zeros(n, device=self.device)
        counts = torch.zeros(n, device=self.device)
        for s, c in self._records:
            sums, counts = sums + s, counts + c
        self._records = []
        return sums, counts

    def means(self, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """Mean CE per modality of (popped, possibly all-reduced) host `sums` and `counts`;
        modalities without target tokens are left out rather than reported as NaN."""
        return {
            name: (sums[i] / counts[i]).item()
            for i, name in enumerate(self.modalities)
            if counts[i] > 0
        }


class MoTLoss:
    """Weighted token-sum cross-entropy (TorchTitan divides by the global token count).

    Every call is recorded in `stats` (per-modality sums and counts for `loss/<modality>`);
    the weights and the vocabulary's modality table live on the stats' device.
    """

    def __init__(
        self,
        token_modality: torch.Tensor,
        stats: ModalityLossStats,
        loss_weights: Sequence[float] = (),
        compile_backend: str | None = None,
    ) -> None:
        modalities = stats.modalities
        if loss_weights and len(loss_weights) != len(modalities):
            raise ValueError(
                f"mot.loss_weights has {len(loss_weights)} entries but mot.modalities has "
                f"{len(modalities)}: {modalities}"
            )
        self.stats = stats
        self.token_modality = token_modality.to(stats.device)
        self.weights = torch.tensor(
            list(loss_weights) or [1.0] * len(modalities), device=stats.device
        )
        self._fn = modality_cross_entropy
        if compile_backend is not None:
            self._fn = torch.compile(modality_cross_entropy, backend=compile_backend)

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, sums, counts = self._fn(pred, labels, self.token_modality, self.weights)
        self.stats.add(sums, counts)
        return loss


def build_mot_loss(
    job_config: JobConfig, loss_stats: ModalityLossStats | None = None, **kwargs
) -> MoTLoss:
    """`TrainSpec.build_loss_fn` for MoT; records into the trainer's `loss_stats` (bound by
    `MoTTrainer`), or into stats of its own when built alone."""
    layout = resolve_job_config(job_config)  # resolved once at load: returns the attached vocabulary
    backend = None
    if job_config.compile.enable and "loss" in job_config.compile.components:
        logger.info("Compiling the loss function with torch.compile")
        backend = job_config.compile.backend
    if loss_stats is None:
        loss_stats = ModalityLossStats(job_config.mot.modalities, training_device())
    return MoTLoss(
        layout.token_modality_table(),
        loss_stats,
        job_config.mot.loss_weights,
        compile_backend=backend,
    )

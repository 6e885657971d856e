"""Cross-entropy weighted and reported per modality of the target token."""

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger


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
    if hasattr(ce, "full_tensor"):  # loss parallel returns a DTensor
        ce = ce.full_tensor()
    flat = labels.flatten(0, 1)
    valid = (flat != IGNORE_INDEX).to(ce.dtype)
    modality = token_modality.index_select(0, flat.clamp(min=0))
    n = weights.numel()
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, modality, ce * valid)
    counts = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, modality, valid)
    return (ce * weights.index_select(0, modality)).sum(), sums, counts


class MoTLoss:
    """Weighted token-sum cross-entropy (TorchTitan divides by the global token count).

    Keeps detached per-modality sums and counts for `loss/<modality>` logging, popped by
    the metrics processor at each log step.
    """

    def __init__(
        self,
        token_modality: torch.Tensor,
        modalities: list[str],
        loss_weights: list[float],
        compile_backend: str | None = None,
    ) -> None:
        if loss_weights and len(loss_weights) != len(modalities):
            raise ValueError(
                f"mot.loss_weights has {len(loss_weights)} entries but mot.modalities has "
                f"{len(modalities)}: {modalities}"
            )
        self.modalities = list(modalities)
        self.token_modality = token_modality
        self.weights = torch.tensor(loss_weights or [1.0] * len(modalities))
        self._fn = modality_cross_entropy
        if compile_backend is not None:
            self._fn = torch.compile(modality_cross_entropy, backend=compile_backend)
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.token_modality.device != labels.device:
            self.token_modality = self.token_modality.to(labels.device)
            self.weights = self.weights.to(labels.device)
        loss, sums, counts = self._fn(pred, labels, self.token_modality, self.weights)
        sums, counts = sums.detach(), counts.detach()
        if self._sums is None or self._counts is None:
            self._sums, self._counts = sums, counts
        else:
            self._sums, self._counts = self._sums + sums, self._counts + counts
        return loss

    def pop_modality_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality CE sums and token counts accumulated on this rank since the last pop."""
        n = len(self.modalities)
        device = self.token_modality.device
        sums = self._sums if self._sums is not None else torch.zeros(n, device=device)
        counts = self._counts if self._counts is not None else torch.zeros(n, device=device)
        self._sums = self._counts = None
        return sums, counts


def build_mot_loss(job_config: JobConfig, **kwargs) -> MoTLoss:
    from torchtitan_mot.data.tokenizer import build_mot_tokenizer

    layout = build_mot_tokenizer(job_config).layout
    backend = None
    if job_config.compile.enable and "loss" in job_config.compile.components:
        logger.info("Compiling the loss function with torch.compile")
        backend = job_config.compile.backend
    return MoTLoss(
        layout.token_modality_table(),
        job_config.mot.modalities,
        job_config.mot.loss_weights,
        compile_backend=backend,
    )

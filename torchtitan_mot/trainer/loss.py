"""Cross-entropy weighted and reported per modality of the target token; in the Transfusion
setting plus lambda times the per-image diffusion MSE."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import JobConfig
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from torchtitan_mot.config import resolve_job_config
from torchtitan_mot.model.schedule import DiffusionSchedule


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


@dataclass
class DiffusionTarget:
    """What the diffusion term of one loss call compares the predicted eps with."""

    noise: torch.Tensor
    """(bs, seq, P) the epsilon that noised the latents (the target)."""
    image_ids: torch.Tensor
    """(bs, seq) image index of each latent position within its row, -1 elsewhere."""
    image_weight: torch.Tensor | float = 1.0
    """Multiplies the summed per-image MSE: global valid tokens / global images in
    training (see `MoTLoss`), 1 in validation (which reads the stats only)."""


def pack_target(labels: torch.Tensor, target: DiffusionTarget) -> torch.Tensor:
    """One (bs, seq, 3 + P) float64 tensor holding labels, image ids, image weight and noise.

    A pipeline schedule splits only a TENSOR target into microbatches (along dim 0, as it
    splits the inputs); packed, every microbatch's loss call gets its own rows of all four.
    float64 holds the int64 ids (< 2**53) and the float32 noise and weight exactly.
    """
    bs, seq = labels.shape
    weight = torch.as_tensor(target.image_weight, dtype=torch.float64, device=labels.device)
    return torch.cat(
        [
            labels.unsqueeze(-1).double(),
            target.image_ids.unsqueeze(-1).double(),
            weight.expand(bs, seq, 1),
            target.noise.double(),
        ],
        dim=-1,
    )


def unpack_target(packed: torch.Tensor) -> tuple[torch.Tensor, DiffusionTarget]:
    """(labels, DiffusionTarget) of one (micro)batch's `pack_target` tensor."""
    weight = packed[:1, :1, 2].reshape(()).float()
    target = DiffusionTarget(packed[..., 3:].float(), packed[..., 1].long(), weight)
    return packed[..., 0].long(), target


def per_image_mse(
    eps: torch.Tensor, noise: torch.Tensor, image_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over images of each image's MSE, number of images): an image's MSE is the mean
    over all its latent elements, so every image weighs the same whatever its size.

    Images are told apart by (row, image id): fixed-size index_add, no host sync.
    """
    bs, seq = image_ids.shape
    err = (eps.float() - noise.float()).pow(2).mean(-1)  # (bs, seq): mean over P
    latent = image_ids >= 0
    slot = (
        torch.arange(bs, device=image_ids.device).unsqueeze(1) * seq + image_ids.clamp(min=0)
    ).flatten()
    sums = torch.zeros(bs * seq, device=err.device).index_add_(
        0, slot, torch.where(latent, err, 0.0).flatten()
    )
    counts = torch.zeros(bs * seq, device=err.device).index_add_(
        0, slot, latent.flatten().float()
    )
    return (sums / counts.clamp(min=1)).sum(), (counts > 0).sum().float()


def count_images(image_ids: torch.Tensor) -> int:
    """Images in a host batch: each row's ids run 0, 1, ... (the dataset's contract)."""
    return int((image_ids.amax(dim=1) + 1).clamp(min=0).sum())


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

    Transfusion (`diffusion_modality` set): the model returns (logits, eps) and the caller
    either sets `target` (a `DiffusionTarget`) before each call or passes the labels packed
    with it (`pack_target`: a float tensor, what a pipeline schedule splits per microbatch). The call returns
    `CE_sum + lambda * image_weight * sum_images MSE_image`; the trainer sets
    `image_weight = N_tok / N_img`, the step's valid tokens and images over all
    data-parallel ranks and microbatches (counted on the host before the first forward,
    all-reduced over the same mesh as the tokens), so after TorchTitan's division by N_tok
    the step's loss is `CE per text token + lambda * mean over the step's images of the
    per-image MSE`. Stats: the diffusion modality's slot holds the MSE sum and image count
    (`loss/image` is the mean per-image MSE); its BOI/EOI marker targets are predicted by
    the LM head and count as text CE (`loss/text` is the whole LM loss).
    """

    def __init__(
        self,
        token_modality: torch.Tensor,
        stats: ModalityLossStats,
        loss_weights: Sequence[float] = (),
        compile_backend: str | None = None,
        diffusion_modality: int | None = None,
        diffusion_weight: float = 1.0,
    ) -> None:
        modalities = stats.modalities
        if loss_weights and len(loss_weights) != len(modalities):
            raise ValueError(
                f"mot.loss_weights has {len(loss_weights)} entries but mot.modalities has "
                f"{len(modalities)}: {modalities}"
            )
        self.stats = stats
        if diffusion_modality is not None:
            token_modality = torch.where(token_modality == diffusion_modality, 0, token_modality)
        self.token_modality = token_modality.to(stats.device)
        self.diffusion_modality = diffusion_modality
        self.diffusion_weight = diffusion_weight
        self.target: DiffusionTarget | None = None
        self._slot = torch.zeros(len(stats.modalities), device=stats.device)
        if diffusion_modality is not None:
            self._slot[diffusion_modality] = 1.0
        self.weights = torch.tensor(
            list(loss_weights) or [1.0] * len(modalities), device=stats.device
        )
        self._fn = modality_cross_entropy
        if compile_backend is not None:
            self._fn = torch.compile(modality_cross_entropy, backend=compile_backend)

    def __call__(
        self, pred: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        logits, eps = pred if isinstance(pred, tuple) else (pred, None)
        target = self.target
        if labels.is_floating_point():
            labels, target = unpack_target(labels)
        loss, sums, counts = self._fn(logits, labels, self.token_modality, self.weights)
        if self.diffusion_modality is not None:
            if eps is None or target is None:
                raise ValueError(
                    "the diffusion loss needs the model's eps (a Transfusion flavor given "
                    "patches) and a DiffusionTarget (set on the loss or packed with the labels)"
                )
            mse_sum, n_images = per_image_mse(eps, target.noise, target.image_ids)
            loss = loss + self.diffusion_weight * target.image_weight * mse_sum
            sums, counts = sums + self._slot * mse_sum, counts + self._slot * n_images
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
        **diffusion_loss_kwargs(job_config),
    )


def diffusion_loss_kwargs(job_config: JobConfig) -> dict[str, Any]:
    """`MoTLoss`'s diffusion arguments from `[mot]` (none in the Chameleon setting)."""
    names = list(job_config.mot.diffusion_modalities)
    if not names:
        return {}
    return dict(
        diffusion_modality=list(job_config.mot.modalities).index(names[0]),
        diffusion_weight=job_config.mot.diffusion_loss_weight,
    )


def noise_batch(
    batch: dict[str, Any], schedule: DiffusionSchedule
) -> tuple[dict[str, Any], DiffusionTarget]:
    """A Transfusion batch (x0 `patches` replaced by x_t, `noise` removed) and the loss's
    target (weight 1: the trainer sets the training weight)."""
    batch = dict(batch)
    noise = batch.pop("noise")
    x0, t, image_ids = batch["patches"], batch["timesteps"], batch["image_ids"]
    batch["patches"] = schedule.add_noise(x0, noise, t)
    return batch, DiffusionTarget(noise, image_ids)

"""Train/validation dataloader builders with torchtitan's `build_dataloader_fn` signature.

With `[mot].diffusion_modalities` each batch's input dict also holds `patches`, `noise`,
`timesteps` and `image_ids` (see `MultimodalDataset`); TorchTitan passes every key but
"input" to the model as keyword arguments. The validation split gets stratified timesteps.
"""

from dataclasses import asdict

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import JobConfig

from .dataset import MultimodalDataset
from .latents import DiffusionWindows
from .tokenizer import MultimodalTokenizer


def _check_tokenizer(tokenizer: MultimodalTokenizer, job_config: JobConfig) -> None:
    """The tokenizer's layout decides token ids, the config decides the model: they must agree."""
    layout, mot = tokenizer.layout, job_config.mot
    if list(layout.modalities) != list(mot.modalities) or list(layout.codebook_sizes) != list(
        mot.codebook_sizes
    ):
        raise ValueError(
            f"tokenizer layout (modalities {list(layout.modalities)}, codebook_sizes "
            f"{list(layout.codebook_sizes)}) differs from [mot] (modalities {mot.modalities}, "
            f"codebook_sizes {mot.codebook_sizes})"
        )


def _build(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: MultimodalTokenizer,
    job_config: JobConfig,
    section: str,
    split: str,
    infinite: bool,
) -> ParallelAwareDataloader:
    cfg = getattr(job_config, section)
    if not cfg.dataset_path:
        raise ValueError(
            f"[{section}].dataset_path must name a MoT dataset directory (with meta.json) or a hub dataset"
        )
    _check_tokenizer(tokenizer, job_config)
    dataset = MultimodalDataset(
        dataset_path=cfg.dataset_path,
        split=split,
        tokenizer=tokenizer,
        seq_len=cfg.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        streaming=job_config.mot.streaming,
        skip_bad_samples=job_config.mot.skip_bad_samples,
        infinite=infinite,
        diffusion=DiffusionWindows.from_job_config(job_config, split),
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **asdict(cfg.dataloader),
        batch_size=cfg.local_batch_size,
    )


def build_mot_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: MultimodalTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """Training batches from `[training].dataset_path`, split "train"."""
    return _build(dp_world_size, dp_rank, tokenizer, job_config, "training", "train", infinite)


def build_mot_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: MultimodalTokenizer,
    job_config: JobConfig,
    infinite: bool = False,
) -> ParallelAwareDataloader:
    """Validation batches from `[validation].dataset_path`, split "validation"."""
    return _build(dp_world_size, dp_rank, tokenizer, job_config, "validation", "validation", infinite)

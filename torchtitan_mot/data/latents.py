"""Latent images in the data pipeline (the Transfusion setting): reading a row's latent,
cutting it into patch positions, and the per-image noise and timestep.

Noise and t are drawn on the host from a generator seeded by (training seed, epoch, global
row index, image index in the row), never from a stream shared across rows, so a sample
gets the same noise on any data-parallel layout and after a resume. The validation split
uses fixed stratified timesteps (TorchTitan's Flux validator: 8 strata) so its loss is
comparable across runs and evaluations.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .meta import LATENT_DTYPES

STRATA = 8
"""Validation timestep strata: the k-th image gets t = floor((k mod 8 + 0.5) / 8 * T)."""
_ORDER_STREAM = 0  # spawn key of a row's caption-order draw; image i draws from 1 + i


@dataclass(frozen=True)
class DiffusionWindows:
    """What `MultimodalDataset` needs to yield Transfusion windows (from `[mot]`)."""

    modalities: tuple[str, ...]
    timesteps: int
    patch_size: int
    seed: int = 0
    caption_first_prob: float = 0.8
    image_first_max_t: int = 0
    stratified: bool = False
    """Fixed stratified t (the validation split) instead of a random t per image."""

    @classmethod
    def from_job_config(cls, job_config: Any, split: str) -> "DiffusionWindows | None":
        """None for an all-discrete config; the validation split gets stratified t."""
        mot = job_config.mot
        if not mot.diffusion_modalities:
            return None
        return cls(
            modalities=tuple(mot.diffusion_modalities),
            timesteps=mot.diffusion_timesteps,
            patch_size=mot.diffusion_patch_size,
            seed=job_config.debug.seed or 0,
            caption_first_prob=mot.caption_first_prob,
            image_first_max_t=mot.diffusion_image_first_max_t,
            stratified=split == "validation",
        )

    def _rng(self, epoch: int, row: int, stream: int) -> np.random.Generator:
        entropy = [self.seed % 2**32, epoch, row]
        return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(stream,)))

    def caption_first(self, epoch: int, row: int) -> bool:
        """Order of a one-caption, one-image row, drawn per row."""
        rng = self._rng(0 if self.stratified else epoch, row, _ORDER_STREAM)
        return bool(rng.random() < self.caption_first_prob)

    def draw(self, epoch: int, row: int, image: int, positions: int, dim: int,
             image_first: bool) -> tuple[int, np.ndarray]:
        """(t, noise (positions, dim) float32) of the `image`-th latent of `row`; an image
        before its caption has t <= image_first_max_t when that cap is set."""
        span = self.timesteps
        if image_first and self.image_first_max_t:
            span = self.image_first_max_t + 1
        rng = self._rng(0 if self.stratified else epoch, row, 1 + image)
        if self.stratified:
            k = (row + image) % STRATA
            t = math.floor((k + 0.5) / STRATA * span)
        else:
            t = int(rng.integers(0, span))
        return t, rng.standard_normal((positions, dim), dtype=np.float32)


def read_latent(segment: dict[str, Any], shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    """A segment's latent as float32 (C, H, W); ValueError saying what is wrong.

    Parquet rows hold raw bytes of meta.json's dtype plus `latent_shape`; JSON rows a nested
    list. The shape must be meta.json's and every value finite.
    """
    value = segment.get("latent")
    if value is None:
        raise ValueError("missing field 'latent' for a latent segment")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype {dtype!r} is not one of {LATENT_DTYPES}")
    if isinstance(value, (bytes, bytearray)):
        stored = segment.get("latent_shape")
        stored = tuple(int(v) for v in stored) if stored is not None else shape
        if stored != shape:
            raise ValueError(f"latent shape {list(stored)} differs from meta.json's {list(shape)}")
        if len(value) != 2 * math.prod(shape):
            raise ValueError(f"{len(value)} bytes cannot hold a {dtype} latent of shape {list(shape)}")
        array = torch.frombuffer(bytearray(value), dtype=getattr(torch, dtype)).float().reshape(shape).numpy()
    else:
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"latent is not a nested list of numbers ({e})") from None
        if array.shape != shape:
            raise ValueError(f"latent shape {list(array.shape)} differs from meta.json's {list(shape)}")
        # rounded to the stored dtype as a parquet row is, so x0 does not depend on the format
        array = torch.from_numpy(array).to(getattr(torch, dtype)).float().numpy()
    if not np.isfinite(array).all():
        raise ValueError(f"latent has {int((~np.isfinite(array)).sum())} NaN/inf values")
    return array

"""Adapter for a pretrained VQ image tokenizer: Chameleon's VQ-VAE from `transformers`
(optional extra `[chameleon]`), loaded from a local directory holding a `ChameleonVQVAE`
(config.json with model_type "chameleon_vqgan" + weights). From a full Chameleon checkpoint:
`ChameleonForConditionalGeneration.from_pretrained(ckpt).model.vqmodel.save_pretrained(dir)`.

Preprocessing follows Chameleon's image processor: RGB, shorter side resized to the VQ-VAE's
`resolution`, centre crop, pixels scaled to [-1, 1]. The checkpoint is recorded in meta.json
by its absolute path, not copied into the dataset.
"""

from pathlib import Path
from typing import Any

import numpy as np

from .tokenizers import ModalityTokenizer, register


@register
class ChameleonImageTokenizer(ModalityTokenizer):
    """transformers' `ChameleonVQVAE` encoder + quantiser (8192 codes, 32x32 ids at 512 px)."""

    kind = "chameleon"

    def __init__(self, model: Any, checkpoint: Path) -> None:
        self.model = model.eval()
        self.checkpoint = checkpoint
        config = model.config
        self.resolution = int(config.resolution)
        side = self.resolution // 2 ** (len(config.channel_multiplier) - 1)
        self._tokens = side * side
        self._codebook_size = int(config.num_embeddings)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ChameleonImageTokenizer":
        from transformers import ChameleonVQVAE

        directory = Path(directory).resolve()
        if not (directory / "config.json").is_file():
            raise ValueError(f"--chameleon-dir {directory} has no config.json of a ChameleonVQVAE")
        return cls(ChameleonVQVAE.from_pretrained(str(directory)), directory)

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def tokens_per_item(self) -> int:
        return self._tokens

    def pixel_values(self, images: list[Any]) -> Any:
        """(N, 3, resolution, resolution) float tensor in [-1, 1]."""
        import torch
        from PIL import ImageOps

        size = (self.resolution, self.resolution)
        arrays = [np.asarray(ImageOps.fit(im.convert("RGB"), size), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()

    def encode(self, items: list[Any]) -> list[np.ndarray]:
        import torch

        if not items:
            return []
        with torch.no_grad():
            ids = self.model.encode(self.pixel_values(items)).image_tokens
        return list(ids.reshape(len(items), -1).numpy().astype(np.int64))

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids -> (side, side, embed_dim) quantised latents: transformers ships the VQ-VAE's
        encoder only, so there is no pixel decoder to call."""
        import torch

        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (self._tokens,):
            raise ValueError(f"expected {self._tokens} ids per image, got shape {ids.shape}")
        side = int(round(self._tokens**0.5))
        with torch.no_grad():
            latents = self.model.quantize.embedding(torch.from_numpy(ids))
        return latents.reshape(side, side, -1).numpy()

    def save(self, directory: Path) -> dict[str, Any]:
        return {"kind": self.kind, "resolution": self.resolution, "files": {"checkpoint": str(self.checkpoint)}}

    @classmethod
    def load(cls, directory: Path, entry: dict[str, Any]) -> "ChameleonImageTokenizer":
        return cls.from_pretrained(Path(directory) / entry["files"]["checkpoint"])

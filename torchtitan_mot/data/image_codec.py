"""Tiny image tokenizer for the demo data: k-means vector quantisation of 2x2 patches.

An 8x8 image (sklearn `load_digits`, pixel values 0..16) becomes 16 tokens (4x4 patch grid,
raster order), each an index into a 256-entry codebook of 2x2 patches. Decoding replaces
each token by its codebook patch, so tokens -> pixels -> tokens is exact (every centroid is
its own nearest centroid) and pixels -> tokens -> pixels loses only the quantisation error.
"""

from pathlib import Path

import numpy as np

PATCH = 2


class ImageCodec:
    """Encode/decode square grey images with a (codebook_size, PATCH*PATCH) codebook."""

    def __init__(self, codebook: np.ndarray):
        if codebook.ndim != 2 or codebook.shape[1] != PATCH * PATCH:
            raise ValueError(f"codebook must have shape (K, {PATCH * PATCH}), got {codebook.shape}")
        self.codebook = codebook.astype(np.float32)

    @classmethod
    def fit(cls, images: np.ndarray, codebook_size: int = 256, seed: int = 0) -> "ImageCodec":
        """Learn the codebook with k-means over all patches (sklearn is only needed here)."""
        from sklearn.cluster import KMeans

        patches = _to_patches(images.astype(np.float32)).reshape(-1, PATCH * PATCH)
        km = KMeans(n_clusters=codebook_size, n_init=1, random_state=seed).fit(patches)
        return cls(km.cluster_centers_)

    @classmethod
    def load(cls, path: str | Path) -> "ImageCodec":
        return cls(np.load(path))

    def save(self, path: str | Path) -> None:
        np.save(path, self.codebook)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) pixels -> (N, H*W/4) int64 tokens (nearest codebook patch)."""
        patches = _to_patches(images.astype(np.float32))
        flat = patches.reshape(-1, PATCH * PATCH)
        dist = ((flat[:, None, :] - self.codebook[None, :, :]) ** 2).sum(-1)
        return dist.argmin(-1).reshape(patches.shape[:2]).astype(np.int64)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(N, T) tokens, T a square number -> (N, H, W) float32 pixels."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n, t = tokens.shape
        side = int(round(t**0.5))
        if side * side != t:
            raise ValueError(f"expected a square number of tokens per image, got {t}")
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise ValueError(f"tokens must lie in [0, {self.codebook_size})")
        patches = self.codebook[tokens].reshape(n, side, side, PATCH, PATCH)
        return patches.transpose(0, 1, 3, 2, 4).reshape(n, side * PATCH, side * PATCH)


def _to_patches(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H/2 * W/2, 4), patches in raster order."""
    n, h, w = images.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"image sides must be multiples of {PATCH}, got {h}x{w}")
    p = images.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 1, 3, 2, 4)
    return p.reshape(n, (h // PATCH) * (w // PATCH), PATCH * PATCH)


def save_png_grid(
    images: np.ndarray, path: str | Path, titles: list[str] | None = None, vmax: float = 16.0
) -> None:
    """Write images side by side (up to 10 per row) as a PNG so samples can be eyeballed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 10)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

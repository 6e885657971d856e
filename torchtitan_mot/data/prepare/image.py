"""Images: decoding with Pillow, and the default image tokenizer, a patch vector-quantiser
fitted on the user's own images.

Every image is converted to the configured colour mode (grey "L" or "RGB"), resized so its
shorter side equals `image_size` and centre-cropped to a square (Pillow's `ImageOps.fit`),
then cut into `patch_size` x `patch_size` patches in raster order; each patch becomes the
index of its nearest k-means centroid. `(image_size / patch_size)**2` ids per image.
"""

import io
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizers import BadInput, ModalityTokenizer, fit_codebook, nearest, register

MODES = ("L", "RGB")


def open_image(source: str | Path | bytes, origin: str, min_side: int = 1) -> Any:
    """Fully decoded PIL image; BadInput naming `origin` if missing, empty, truncated,
    undecodable or smaller than `min_side` pixels on a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, bytes):
            if not source:
                raise BadInput(f"{origin}: empty image bytes")
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise BadInput(f"{origin}: image file {path} does not exist")
            if path.stat().st_size == 0:
                raise BadInput(f"{origin}: image file {path} is empty (0 bytes)")
            image = Image.open(path)
        image.load()  # decode now: truncated files fail here, not later in a worker
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{origin}: unreadable image ({type(e).__name__}: {e})") from None
    if min(image.size) < min_side:
        raise BadInput(f"{origin}: image is {image.size[0]}x{image.size[1]}, smaller than the patch size {min_side}")
    return image


@register
class PatchVQImageTokenizer(ModalityTokenizer):
    """k-means codebook over square pixel patches (pixels scaled to [0, 1])."""

    kind = "patch_vq"

    def __init__(self, codebook: np.ndarray, image_size: int, patch_size: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")
        if image_size % patch_size:
            raise ValueError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
        channels = 1 if mode == "L" else 3
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size * channels:
            raise ValueError(
                f"codebook shape {codebook.shape} does not fit {patch_size}x{patch_size} {mode} patches"
            )
        self.codebook = codebook.astype(np.float32)
        self.image_size, self.patch_size, self.mode, self.channels = image_size, patch_size, mode, channels

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def tokens_per_item(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def pixels(self, image: Any) -> np.ndarray:
        """(image_size, image_size, channels) float32 in [0, 1]: mode, resize, centre crop."""
        from PIL import ImageOps

        if image.mode != self.mode:
            image = image.convert(self.mode)
        image = ImageOps.fit(image, (self.image_size, self.image_size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array.reshape(self.image_size, self.image_size, self.channels)

    def patches(self, image: Any) -> np.ndarray:
        """(tokens_per_item, patch*patch*channels) patch vectors in raster order."""
        p, g = self.patch_size, self.image_size // self.patch_size
        x = self.pixels(image).reshape(g, p, g, p, self.channels).transpose(0, 2, 1, 3, 4)
        return x.reshape(g * g, p * p * self.channels)

    @classmethod
    def fit(
        cls, images: Any, image_size: int, patch_size: int, mode: str, codebook_size: int, seed: int
    ) -> "PatchVQImageTokenizer":
        """Fit the codebook on the patches of `images` (an iterable of PIL images)."""
        shape = cls(np.zeros((1, patch_size * patch_size * (1 if mode == "L" else 3))), image_size, patch_size, mode)
        codebook = fit_codebook(
            (shape.patches(im) for im in images), codebook_size, seed, "--image-codebook-size"
        )
        return cls(codebook, image_size, patch_size, mode)

    def encode(self, items: list[Any]) -> list[np.ndarray]:
        if not items:
            return []
        vectors = np.concatenate([self.patches(im) for im in items])
        return list(nearest(vectors, self.codebook).reshape(len(items), self.tokens_per_item))

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids of one image -> (image_size, image_size, channels) float32 pixels in [0, 1]."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (self.tokens_per_item,):
            raise ValueError(f"expected {self.tokens_per_item} ids per image, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(f"ids must lie in [0, {self.codebook_size})")
        p, g = self.patch_size, self.image_size // self.patch_size
        x = self.codebook[ids].reshape(g, g, p, p, self.channels).transpose(0, 2, 1, 3, 4)
        return x.reshape(self.image_size, self.image_size, self.channels)

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / "image_codebook.npy", self.codebook)
        return {
            "kind": self.kind,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "mode": self.mode,
            "files": {"codebook": "image_codebook.npy"},
        }

    @classmethod
    def load(cls, directory: Path, entry: dict[str, Any]) -> "PatchVQImageTokenizer":
        codebook = np.load(Path(directory) / entry["files"]["codebook"])
        return cls(codebook, entry["image_size"], entry["patch_size"], entry["mode"])

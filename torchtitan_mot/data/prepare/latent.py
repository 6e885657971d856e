"""Latent image encoders for the Transfusion setting: an image becomes a continuous
(C, H, W) latent instead of codebook ids.

- `pixels`: the image itself, converted to the colour mode, resized and centre-cropped to
  `image_size` (as `patch_vq` does), scaled to [-1, 1]: C = 1 (L) or 3 (RGB). For the demo
  and tests: decoding is exact, so generation can be judged by eye without a VAE.
- `vae`: diffusers' `AutoencoderKL` from a local directory (the user's own or a downloaded
  one, e.g. a Stable Diffusion VAE): latent = (posterior mean - shift_factor) *
  scaling_factor, as diffusers' pipelines scale latents before their diffusion model.

meta.json records, per latent modality, `{"shape": [C, H, W], "dtype": ..., "encoder":
entry}`; `load_latent_encoder(dataset_dir, modality)` rebuilds the encoder from it (the VAE
by its recorded absolute path, not copied into the dataset). Rows store a latent as its
raw little-endian bytes in that dtype next to its shape (`latent_bytes`, `latent_array`).
"""

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..meta import LATENT_DTYPES
from .image import MODES


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {name!r}")
    return getattr(torch, name)


def latent_bytes(latent: np.ndarray, dtype: str) -> bytes:
    """A float latent as the raw bytes of `dtype` (what a parquet row stores)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)).to(_torch_dtype(dtype)).view(
        torch.int16).numpy().tobytes()


def latent_array(data: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Inverse of `latent_bytes`: float32 array of `shape`; ValueError when the byte count
    does not match the shape."""
    import torch

    if len(data) != 2 * int(np.prod(shape)):
        raise ValueError(f"{len(data)} bytes cannot hold a {dtype} latent of shape {list(shape)}")
    values = torch.frombuffer(bytearray(data), dtype=_torch_dtype(dtype)) if data else torch.empty(0)
    return values.float().reshape(shape).numpy()


class LatentEncoder(ABC):
    """Decoded PIL images -> float (C, H, W) latents, and back to pixels."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every latent."""

    @abstractmethod
    def encode(self, items: list[Any]) -> list[np.ndarray]:
        """One float32 (C, H, W) latent per PIL image."""

    @abstractmethod
    def decode(self, latent: np.ndarray) -> np.ndarray:
        """One (C, H, W) latent -> (height, width, channels) float32 pixels in [0, 1]."""

    @abstractmethod
    def entry(self) -> dict[str, Any]:
        """meta.json's `encoder` entry (`kind` + settings) that `load` rebuilds it from."""

    @classmethod
    @abstractmethod
    def load(cls, entry: dict[str, Any]) -> "LatentEncoder": ...


_REGISTRY: dict[str, type[LatentEncoder]] = {}


def _register(cls: type[LatentEncoder]) -> type[LatentEncoder]:
    _REGISTRY[cls.kind] = cls
    return cls


def _fit_square(image: Any, mode: str, size: int) -> np.ndarray:
    """(size, size, channels) float32 in [-1, 1]: colour mode, resize, centre crop."""
    from PIL import ImageOps

    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(ImageOps.fit(image, (size, size)), dtype=np.float32) / 127.5 - 1.0
    return array.reshape(size, size, 1 if mode == "L" else 3)


@_register
class PixelLatentEncoder(LatentEncoder):
    """The resized image as the latent: (channels, image_size, image_size) in [-1, 1]."""

    kind = "pixels"

    def __init__(self, image_size: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")
        self.image_size, self.mode = image_size, mode

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, self.image_size, self.image_size)

    def encode(self, items: list[Any]) -> list[np.ndarray]:
        return [_fit_square(im, self.mode, self.image_size).transpose(2, 0, 1).copy() for im in items]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(latent, np.float32).transpose(1, 2, 0) + 1) / 2, 0, 1)

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size, "mode": self.mode}

    @classmethod
    def load(cls, entry: dict[str, Any]) -> "PixelLatentEncoder":
        return cls(entry["image_size"], entry["mode"])


@_register
class VAELatentEncoder(LatentEncoder):
    """diffusers' `AutoencoderKL`: posterior mean, shifted and scaled as its config says."""

    kind = "vae"

    def __init__(self, vae: Any, directory: Path, image_size: int) -> None:
        config = vae.config
        self.vae, self.directory = vae.eval(), directory
        self.mode = {1: "L", 3: "RGB"}.get(int(config.in_channels))
        if self.mode is None:
            raise ValueError(f"--vae-dir {directory}: in_channels {config.in_channels} is neither 1 nor 3")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
        self.image_size = image_size
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self._shape = (int(config.latent_channels), image_size // factor, image_size // factor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, image_size: int) -> "VAELatentEncoder":
        from diffusers import AutoencoderKL

        directory = Path(directory).resolve()
        if not (directory / "config.json").is_file():
            raise ValueError(f"--vae-dir {directory} has no config.json of a diffusers AutoencoderKL")
        return cls(AutoencoderKL.from_pretrained(str(directory)), directory, image_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def encode(self, items: list[Any]) -> list[np.ndarray]:
        import torch

        if not items:
            return []
        pixels = np.stack([_fit_square(im, self.mode, self.image_size) for im in items])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean
        latents = ((mean - self.shift_factor) * self.scaling_factor).float().numpy()
        return list(latents)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        import torch

        z = torch.as_tensor(np.asarray(latent, np.float32))[None] / self.scaling_factor + self.shift_factor
        with torch.no_grad():
            image = self.vae.decode(z).sample[0]
        return ((image.permute(1, 2, 0).float().numpy() + 1) / 2).clip(0, 1)

    def entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "vae_dir": str(self.directory), "image_size": self.image_size,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "latent": "posterior mean"}

    @classmethod
    def load(cls, entry: dict[str, Any]) -> "VAELatentEncoder":
        return cls.from_pretrained(entry["vae_dir"], entry["image_size"])


def latent_encoder_from_entry(entry: dict[str, Any]) -> LatentEncoder:
    """Rebuild an encoder from meta.json's `latents[modality]["encoder"]`."""
    if entry.get("kind") not in _REGISTRY:
        raise ValueError(f"unknown latent encoder kind {entry.get('kind')!r}, known: {sorted(_REGISTRY)}")
    return _REGISTRY[entry["kind"]].load(entry)


def load_latent_encoder(dataset_dir: str | Path, modality: str) -> LatentEncoder:
    """The encoder that made `modality`'s latents in the dataset at `dataset_dir`
    (generation decodes sampled latents with it)."""
    meta_path = Path(dataset_dir) / "meta.json"
    entry = json.loads(meta_path.read_text()).get("latents", {}).get(modality)
    if entry is None:
        raise ValueError(f"{meta_path} records no latents for modality {modality!r}")
    return latent_encoder_from_entry(entry["encoder"])

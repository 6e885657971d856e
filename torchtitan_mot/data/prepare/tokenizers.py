"""The one interface every non-text tokenizer of `prepare` implements, and its registry.

A dataset directory records in meta.json, per non-text modality, which tokenizer produced
its ids (`kind`), its settings and its files (relative to the dataset directory), so
`load_tokenizer(dataset_dir, modality)` rebuilds it from the dataset alone: nothing is
looked up next to the package source.
"""

import json
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np


class BadInput(ValueError):
    """An input file or line that cannot become a sample; the message names it."""


class ModalityTokenizer(ABC):
    """Turns decoded items (PIL images, waveforms) into codebook ids and back."""

    kind: ClassVar[str]
    """Registry name, written to meta.json."""

    @property
    @abstractmethod
    def codebook_size(self) -> int: ...

    @property
    @abstractmethod
    def tokens_per_item(self) -> int | None:
        """Ids per item, or None when it varies (e.g. with clip length)."""

    @abstractmethod
    def encode(self, items: list[Any]) -> list[np.ndarray]:
        """One int64 id array per item, each id in `[0, codebook_size)`."""

    @abstractmethod
    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Ids of one item back to the tokenizer's signal space (pixels, log-mel frames...)."""

    @abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the tokenizer's files under `directory`; return its meta.json entry
        (`kind`, settings, `files` relative to `directory`)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, entry: dict[str, Any]) -> "ModalityTokenizer":
        """Inverse of `save`."""


_REGISTRY: dict[str, type[ModalityTokenizer]] = {}


def register(cls: type[ModalityTokenizer]) -> type[ModalityTokenizer]:
    _REGISTRY[cls.kind] = cls
    return cls


def load_tokenizer(dataset_dir: str | Path, modality: str) -> ModalityTokenizer:
    """The tokenizer that produced `modality`'s ids in the dataset at `dataset_dir`."""
    root = Path(dataset_dir)
    entry = json.loads((root / "meta.json").read_text()).get("tokenizers", {}).get(modality)
    if entry is None:
        raise ValueError(f"{root / 'meta.json'} records no tokenizer for modality {modality!r}")
    return tokenizer_from_entry(root, entry)


def tokenizer_from_entry(directory: Path, entry: dict[str, Any]) -> ModalityTokenizer:
    """Rebuild a tokenizer from its meta.json entry; its files are relative to `directory`."""
    if entry["kind"] == "chameleon" and "chameleon" not in _REGISTRY:
        from . import chameleon  # noqa: F401  registers on import (needs the [chameleon] extra)
    if entry["kind"] not in _REGISTRY:
        raise ValueError(f"{directory}: unknown tokenizer kind {entry['kind']!r}, known: {sorted(_REGISTRY)}")
    return _REGISTRY[entry["kind"]].load(Path(directory), entry)


def nearest(vectors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row (squared L2) for every row of `vectors`, in BLAS."""
    scores = vectors @ codebook.T
    scores *= -2.0
    scores += (codebook * codebook).sum(1)[None, :]
    return scores.argmin(1).astype(np.int64)


def fit_codebook(
    batches: Iterable[np.ndarray], codebook_size: int, seed: int, setting: str, chunk: int = 1 << 20
) -> np.ndarray:
    """k-means centroids with scikit-learn's MiniBatchKMeans.

    `batches` yields (n, dim) float arrays. Up to `chunk` vectors are pooled in memory; a
    fitting set that fits in one chunk gets a full `fit` (several passes), a larger one is fed
    chunk by chunk through `partial_fit`, so memory stays bounded whatever its size.
    """
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(
        n_clusters=codebook_size, random_state=seed, n_init=1, batch_size=max(1024, 2 * codebook_size)
    )
    pooled: list[np.ndarray] = []
    pooled_rows, seen, chunks = 0, 0, 0
    for batch in batches:
        pooled.append(np.asarray(batch, dtype=np.float32))
        pooled_rows += len(batch)
        seen += len(batch)
        if pooled_rows >= chunk:
            km.partial_fit(np.concatenate(pooled))
            pooled, pooled_rows, chunks = [], 0, chunks + 1
    if seen < codebook_size:
        raise ValueError(
            f"{setting}={codebook_size} is larger than the {seen} vectors available to fit it: "
            "lower it or give more data"
        )
    if chunks == 0:
        km.fit(np.concatenate(pooled))
    elif pooled_rows:
        km.partial_fit(np.concatenate(pooled))
    return km.cluster_centers_.astype(np.float32)

"""Turning planned items into dataset rows, in this process or in `--num-workers` processes.

Workers are started with "spawn" (a forked child of a process that already ran torch's
thread pools can deadlock) and rebuild the tokenizers from the files saved in the output
directory, exactly as a user of the dataset would.
"""

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .audio import read_audio
from .image import open_image
from .latent import LatentEncoder, latent_bytes, latent_encoder_from_entry
from .sources import Item, open_hf_dataset
from .tokenizers import BadInput, ModalityTokenizer, tokenizer_from_entry

# (item, text first?) -> row, or the BadInput message for a skippable bad item.
Planned = tuple[Item, bool]
Row = dict[str, Any]
Entries = dict[str, dict[str, Any]]  # modality -> tokenizer (or latents) entry of meta.json


class MediaReader:
    """Decodes an item's media: a PIL image (at least `min_side` pixels a side) or a mono
    waveform at `sample_rate`; BadInput names the item."""

    def __init__(self, hf: tuple[str, str, str] | None, min_side: int, sample_rate: int) -> None:
        self._hf_spec, self._hf = hf, None
        self.min_side, self.sample_rate = min_side, sample_rate

    def __call__(self, item: Item) -> Any:
        if item.modality == "speech":
            return read_audio(str(item.media), item.origin, self.sample_rate)
        if not isinstance(item.media, int):
            return open_image(str(item.media), item.origin, self.min_side)
        if self._hf is None:
            assert self._hf_spec is not None, "a dataset row without --hf-dataset"
            self._hf = open_hf_dataset(*self._hf_spec)
        value = self._hf[item.media][self._hf_spec[2]] or {}
        data = value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else b"")
        return open_image(data, item.origin, self.min_side)


class Encoder:
    """Decodes an item's media and tokenizes it with the dataset's tokenizers, or encodes it
    into a latent with its latent encoder."""

    def __init__(
        self, dataset_dir: Path, entries: Entries, latents: Entries, hf: tuple[str, str, str] | None
    ) -> None:
        self.tokenizers: dict[str, ModalityTokenizer] = {
            m: tokenizer_from_entry(dataset_dir, e) for m, e in entries.items()
        }
        self.latents: dict[str, tuple[LatentEncoder, str]] = {
            m: (latent_encoder_from_entry(e["encoder"]), e["dtype"]) for m, e in latents.items()
        }
        image, speech = self.tokenizers.get("image"), self.tokenizers.get("speech")
        self.media = MediaReader(hf, getattr(image, "patch_size", 1), getattr(speech, "sample_rate", 0))

    def encode(self, chunk: list[Planned]) -> list[Row | str]:
        out: list[Row | str] = [""] * len(chunk)
        by_modality: dict[str, list[tuple[int, Any]]] = {}
        for i, (item, _) in enumerate(chunk):
            if item.modality == "text":
                out[i] = {"segments": [_text(item.text)]}
                continue
            try:
                by_modality.setdefault(item.modality, []).append((i, self.media(item)))
            except BadInput as e:
                out[i] = str(e)
        for modality, decoded in by_modality.items():
            if modality in self.latents:
                encoder, dtype = self.latents[modality]
                media_segments = [
                    {"modality": modality, "text": None, "tokens": None,
                     "latent": latent_bytes(z, dtype), "latent_shape": list(z.shape)}
                    for z in encoder.encode([m for _, m in decoded])
                ]
            else:
                media_segments = [
                    {"modality": modality, "text": None, "tokens": np.asarray(tokens, dtype=np.int32)}
                    for tokens in self.tokenizers[modality].encode([m for _, m in decoded])
                ]
            for (i, _), media in zip(decoded, media_segments):
                item, text_first = chunk[i]
                segments = [_text(item.text), media] if text_first else [media, _text(item.text)]
                out[i] = {"segments": segments}
        return out


def _text(text: str) -> dict[str, Any]:
    return {"modality": "text", "text": text, "tokens": None}


_worker: Encoder | None = None


def _init_worker(dataset_dir: Path, entries: Entries, latents: Entries, hf: tuple[str, str, str] | None) -> None:
    import torch

    torch.set_num_threads(1)
    global _worker
    _worker = Encoder(dataset_dir, entries, latents, hf)


def _encode_in_worker(chunk: list[Planned]) -> list[Row | str]:
    assert _worker is not None
    return _worker.encode(chunk)


def encode_all(
    planned: list[Planned], dataset_dir: Path, entries: Entries, latents: Entries,
    hf: tuple[str, str, str] | None, num_workers: int, chunk_size: int,
) -> Iterator[Row | str]:
    """Rows (or bad-input messages) in the order of `planned`."""
    chunks = [planned[i : i + chunk_size] for i in range(0, len(planned), chunk_size)]
    if num_workers <= 1:
        encoder = Encoder(dataset_dir, entries, latents, hf)
        for chunk in chunks:
            yield from encoder.encode(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(dataset_dir, entries, latents, hf)) as pool:
        for rows in pool.imap(_encode_in_worker, chunks):
            yield from rows

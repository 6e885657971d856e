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
from .sources import Item, open_hf_dataset
from .tokenizers import BadInput, ModalityTokenizer, tokenizer_from_entry

# (item, text first?) -> row, or the BadInput message for a skippable bad item.
Planned = tuple[Item, bool]
Row = dict[str, Any]
Entries = dict[str, dict[str, Any]]  # modality -> tokenizer entry of meta.json


class Encoder:
    """Decodes an item's media and tokenizes it with the dataset's tokenizers."""

    def __init__(self, dataset_dir: Path, entries: Entries, hf: tuple[str, str, str] | None) -> None:
        self.tokenizers: dict[str, ModalityTokenizer] = {
            m: tokenizer_from_entry(dataset_dir, e) for m, e in entries.items()
        }
        self._hf_spec = hf
        self._hf: Any = None

    def media(self, item: Item) -> Any:
        """Decoded media of one item (PIL image or waveform); BadInput names the item."""
        tok = self.tokenizers[item.modality]
        if item.modality == "speech":
            return read_audio(str(item.media), item.origin, tok.sample_rate)
        min_side = getattr(tok, "patch_size", 1)
        if isinstance(item.media, int):
            if self._hf is None:
                assert self._hf_spec is not None
                self._hf = open_hf_dataset(*self._hf_spec)
            value = self._hf[item.media][self._hf_spec[2]]
            data = value.get("bytes") if value else None
            if not data and value and value.get("path"):
                data = Path(value["path"]).read_bytes()
            return open_image(data or b"", item.origin, min_side)
        return open_image(str(item.media), item.origin, min_side)

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
            ids = self.tokenizers[modality].encode([m for _, m in decoded])
            for (i, _), tokens in zip(decoded, ids):
                item, text_first = chunk[i]
                media = {"modality": modality, "text": None, "tokens": np.asarray(tokens, dtype=np.int32)}
                segments = [_text(item.text), media] if text_first else [media, _text(item.text)]
                out[i] = {"segments": segments}
        return out


def _text(text: str) -> dict[str, Any]:
    return {"modality": "text", "text": text, "tokens": None}


_worker: Encoder | None = None


def _init_worker(dataset_dir: Path, entries: Entries, hf: tuple[str, str, str] | None) -> None:
    import torch

    torch.set_num_threads(1)
    global _worker
    _worker = Encoder(dataset_dir, entries, hf)


def _encode_in_worker(chunk: list[Planned]) -> list[Row | str]:
    assert _worker is not None
    return _worker.encode(chunk)


def encode_all(
    planned: list[Planned], dataset_dir: Path, entries: Entries, hf: tuple[str, str, str] | None,
    num_workers: int, chunk_size: int,
) -> Iterator[Row | str]:
    """Rows (or bad-input messages) in the order of `planned`."""
    chunks = [planned[i : i + chunk_size] for i in range(0, len(planned), chunk_size)]
    if num_workers <= 1:
        encoder = Encoder(dataset_dir, entries, hf)
        for chunk in chunks:
            yield from encoder.encode(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(dataset_dir, entries, hf)) as pool:
        for rows in pool.imap(_encode_in_worker, chunks):
            yield from rows

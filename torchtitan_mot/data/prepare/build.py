"""`prepare`: raw inputs -> a MoT dataset directory (meta.json + parquet shards).

Phases (each with a tqdm bar): scan the listings, fit the tokenizers on a seeded sample,
encode every item (optionally in worker processes) and write shards. Everything goes to a
temporary sibling directory that is renamed to `out` only at the end, so an interrupted run
never leaves something that looks like a dataset.
"""

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .encode import MediaReader, Planned, encode_all
from .sources import AUDIO_SUFFIXES, IMAGE_SUFFIXES, Item, scan_hf, scan_media, scan_text_docs
from .latent import LATENT_DTYPES, LatentEncoder
from .tokenizers import BadInput, ModalityTokenizer

ORDERS = ("text-first", "media-first", "random")
FORMAT = "torchtitan_mot.parquet/1"
SEGMENT = pa.struct([("modality", pa.string()), ("text", pa.string()), ("tokens", pa.list_(pa.int32()))])
SCHEMA = pa.schema([("segments", pa.list_(SEGMENT))])
# A dataset with latent images (--image-encoder) adds each latent's raw bytes (meta.json's
# dtype) and its (C, H, W) shape; discrete datasets keep SCHEMA.
LATENT_SEGMENT = pa.struct([*SEGMENT, ("latent", pa.binary()), ("latent_shape", pa.list_(pa.int32()))])
LATENT_SCHEMA = pa.schema([("segments", pa.list_(LATENT_SEGMENT))])
IMAGE_ENCODERS = ("pixels", "vae")
# Row groups are what the streaming loader hands out; a split gets at least this many (rows
# permitting) so even a small validation split feeds this many data-parallel ranks.
MIN_ROW_GROUPS = 256


@dataclass
class PrepareConfig:
    """Every option of `python -m torchtitan_mot.data.prepare` (see `--help`)."""

    out: Path
    images: Path | None = None
    captions: Path | None = None
    hf_dataset: str | None = None
    hf_split: str = "train"
    image_column: str = "image"
    text_column: str = "text"
    audio: Path | None = None
    transcripts: Path | None = None
    text_docs: Path | None = None
    text_docs_ratio: float | None = None
    order: str = "random"
    image_tokenizer: str = "patch_vq"
    image_size: int = 64
    patch_size: int = 4
    image_mode: str = "RGB"
    image_codebook_size: int = 1024
    chameleon_dir: Path | None = None
    image_encoder: str | None = None
    vae_dir: Path | None = None
    latent_dtype: str = "float16"
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 40
    audio_codebook_size: int = 1024
    fit_items: int = 2000
    validation_fraction: float = 0.05
    shard_rows: int = 50_000
    row_group_rows: int = 1000
    text_tokenizer: Path | None = None
    seed: int = 0
    num_workers: int = 0
    chunk_size: int = 64
    skip_bad: bool = False
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        """Fail at start-up on options that would be ignored or cannot work, naming them."""
        if (self.images is None) != (self.captions is None):
            raise ValueError("--images and --captions go together")
        if (self.audio is None) != (self.transcripts is None):
            raise ValueError("--audio and --transcripts go together")
        if self.images is None and self.hf_dataset is None and self.audio is None and self.text_docs is None:
            raise ValueError("nothing to prepare: give --images/--captions, --hf-dataset, --audio/--transcripts or --text-docs")
        if self.text_docs_ratio is not None and (self.text_docs is None or not 0 < self.text_docs_ratio < 1):
            raise ValueError("--text-docs-ratio needs --text-docs and a value in (0, 1)")
        if self.image_mode not in ("L", "RGB"):
            raise ValueError(f"--image-mode must be L or RGB, got {self.image_mode!r}")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {ORDERS}, got {self.order!r}")
        if self.image_tokenizer not in ("patch_vq", "chameleon"):
            raise ValueError(f"--image-tokenizer must be patch_vq or chameleon, got {self.image_tokenizer!r}")
        if (self.image_tokenizer == "chameleon") != (self.chameleon_dir is not None):
            raise ValueError("--image-tokenizer chameleon and --chameleon-dir go together")
        if self.image_encoder is not None:
            if self.image_encoder not in IMAGE_ENCODERS:
                raise ValueError(f"--image-encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
            if self.image_tokenizer != "patch_vq" or self.chameleon_dir is not None:
                raise ValueError("--image-encoder (latent images) and --image-tokenizer/--chameleon-dir "
                                 "(discrete image ids) are alternatives: give one")
        if (self.image_encoder == "vae") != (self.vae_dir is not None):
            raise ValueError("--image-encoder vae and --vae-dir go together")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"--latent-dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation-fraction must lie in [0, 1), got {self.validation_fraction}")
        for name in ("shard_rows", "row_group_rows", "fit_items", "chunk_size", "image_codebook_size",
                     "audio_codebook_size", "image_size", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def shard_count(rows: int, shard_rows: int) -> int:
    """Shards for `rows` rows of at most ~`shard_rows` each, rounded up to a power of two (up
    to 8) or a multiple of 8, so the count divides evenly across common rank x worker counts."""
    n = max(1, math.ceil(rows / shard_rows))
    if n > 1:
        n = 1 << (n - 1).bit_length() if n <= 8 else 8 * math.ceil(n / 8)
    return max(1, min(n, rows))


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a MoT dataset" if (out / "meta.json").is_file() else "files"
        if not force:
            raise FileExistsError(f"{out} already holds {what}; pass --force to replace it")
        if what == "files" and out.is_dir():
            raise FileExistsError(f"{out} holds files but no meta.json: not replacing something that is not a dataset")


def _scan(cfg: PrepareConfig, skipped: list[str]) -> tuple[list[Item], list[Item]]:
    """(items with media, text-only documents)."""
    media: list[Item] = []
    if cfg.images is not None:
        media += scan_media(cfg.images, cfg.captions, "image", IMAGE_SUFFIXES, cfg.skip_bad, skipped)
    if cfg.hf_dataset is not None:
        media += scan_hf(cfg.hf_dataset, cfg.hf_split, cfg.image_column, cfg.text_column, cfg.skip_bad, skipped)
    if cfg.audio is not None:
        media += scan_media(cfg.audio, cfg.transcripts, "speech", AUDIO_SUFFIXES, cfg.skip_bad, skipped)
    docs = scan_text_docs(cfg.text_docs, cfg.skip_bad, skipped) if cfg.text_docs is not None else []
    if cfg.text_docs_ratio is not None:
        wanted = round(cfg.text_docs_ratio / (1 - cfg.text_docs_ratio) * len(media))
        if wanted > len(docs):
            raise ValueError(
                f"--text-docs-ratio {cfg.text_docs_ratio} needs {wanted} documents next to {len(media)} "
                f"media items, {cfg.text_docs} has {len(docs)}"
            )
        docs = random.Random(cfg.seed).sample(docs, wanted)
    return media, docs


def _fit_sample(items: list[Item], cfg: PrepareConfig, load: MediaReader, what: str) -> Iterator[Any]:
    """Decoded media of up to `fit_items` items, drawn with the seed. A bad item raises, or
    with --skip-bad is left out here and counted when the encoding phase meets it."""
    rng = random.Random(cfg.seed)
    sample = rng.sample(items, min(cfg.fit_items, len(items)))
    for item in tqdm(sample, desc=f"fit {what}", disable=not cfg.progress):
        try:
            yield load(item)
        except BadInput:
            if not cfg.skip_bad:
                raise


def _latent_encoder(cfg: PrepareConfig) -> LatentEncoder:
    from .latent import PixelLatentEncoder, VAELatentEncoder

    if cfg.image_encoder == "vae":
        return VAELatentEncoder.from_pretrained(cfg.vae_dir, cfg.image_size)
    return PixelLatentEncoder(cfg.image_size, cfg.image_mode)


def _fit(cfg: PrepareConfig, media: list[Item], tmp: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Fit/load one tokenizer per discrete non-text modality, save it into `tmp`; load the
    latent encoder of latent images. Returns meta.json's `tokenizers` and `latents` entries."""
    from .audio import LogMelAudioTokenizer
    from .image import PatchVQImageTokenizer

    hf = (cfg.hf_dataset, cfg.hf_split, cfg.image_column) if cfg.hf_dataset else None
    discrete_images = cfg.image_encoder is None and cfg.image_tokenizer == "patch_vq"
    read = MediaReader(hf, cfg.patch_size if discrete_images else 1, cfg.sample_rate)
    made: dict[str, ModalityTokenizer] = {}
    latents: dict[str, dict[str, Any]] = {}
    images = [i for i in media if i.modality == "image"]
    audio = [i for i in media if i.modality == "speech"]
    if images and cfg.image_encoder is not None:
        encoder = _latent_encoder(cfg)
        latents["image"] = {"shape": list(encoder.shape), "dtype": cfg.latent_dtype, "encoder": encoder.entry()}
    elif images and cfg.image_tokenizer == "chameleon":
        from .chameleon import ChameleonImageTokenizer

        made["image"] = ChameleonImageTokenizer.from_pretrained(cfg.chameleon_dir)
    elif images:
        made["image"] = PatchVQImageTokenizer.fit(
            _fit_sample(images, cfg, read, "image codebook"),
            cfg.image_size, cfg.patch_size, cfg.image_mode, cfg.image_codebook_size, cfg.seed,
        )
    if audio:
        made["speech"] = LogMelAudioTokenizer.fit(
            _fit_sample(audio, cfg, read, "audio codebook"),
            cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.audio_codebook_size, cfg.seed,
        )
    entries = {}
    for modality, tok in made.items():
        entries[modality] = {**tok.save(tmp), "codebook_size": tok.codebook_size, "tokens_per_item": tok.tokens_per_item}
    return entries, latents


class _ShardWriter:
    """Writes one split's rows into `n_shards` parquet files of planned sizes."""

    def __init__(self, root: Path, split: str, rows: int, cfg: PrepareConfig) -> None:
        self.root, self.split, self.cfg = root, split, cfg
        n = shard_count(rows, cfg.shard_rows) if rows else 0
        self.plan = [rows // n + (k < rows % n) for k in range(n)] if n else []
        self.group_rows = min(cfg.row_group_rows, max(1, rows // MIN_ROW_GROUPS))
        self.schema = SCHEMA if cfg.image_encoder is None else LATENT_SCHEMA
        (root / split).mkdir()
        self.files: list[str] = []
        self._buffer: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            name = f"{self.split}/part-{len(self.files):05d}-of-{len(self.plan):05d}.parquet"
            self.files.append(name)
            # min/max statistics of latent bytes are useless and double a small shard's size
            self._writer = pq.ParquetWriter(self.root / name, self.schema,
                                            write_statistics=self.schema is SCHEMA)
        self._buffer.append(row)
        self._in_shard += 1
        self.rows += 1
        if len(self._buffer) >= self.group_rows:
            self._flush()
        if self._in_shard >= self.plan[len(self.files) - 1] and len(self.files) < len(self.plan):
            self._close_shard()

    def _flush(self) -> None:
        if self._buffer and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0

    def close(self) -> list[str]:
        """Close the last shard; names reflect shards actually written (skips may drop some)."""
        self._close_shard()
        final = []
        for k, name in enumerate(self.files):
            new = f"{self.split}/part-{k:05d}-of-{len(self.files):05d}.parquet"
            if new != name:
                os.replace(self.root / name, self.root / new)
            final.append(new)
        return final


def _text_counter(path: Path | None) -> tuple[Any, dict[str, Any] | None]:
    """Count text in tokens of the text tokenizer the dataset assumes (or in characters)."""
    if path is None:
        return len, None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    return (lambda t: len(tok.encode(t, add_special_tokens=False).ids)), {
        "path": str(path), "vocab_size": tok.get_vocab_size()
    }


def prepare(cfg: PrepareConfig) -> Path:
    """Build the dataset at `cfg.out`; returns its path."""
    cfg.check()
    out = Path(cfg.out)
    _check_out(out, cfg.force)
    skipped: list[str] = []
    media, docs = _scan(cfg, skipped)
    if not media and not docs:
        raise ValueError("no usable samples in the inputs")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _build(cfg, media, docs, tmp, skipped)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build(cfg: PrepareConfig, media: list[Item], docs: list[Item], tmp: Path, skipped: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    tokenizers, latents = _fit(cfg, media, tmp)
    fitted = time.perf_counter()
    modalities = ["text"] + [m for m in ("image", "speech") if m in tokenizers or m in latents]

    items = media + docs
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(items))
    n_val = int(round(len(items) * cfg.validation_fraction))
    first = np.random.default_rng(cfg.seed + 1).random(len(items)) < 0.5
    text_first = {"text-first": np.ones(len(items), bool), "media-first": np.zeros(len(items), bool)}.get(cfg.order, first)
    planned: list[Planned] = [(items[i], bool(text_first[i])) for i in order]

    count_text, text_meta = _text_counter(cfg.text_tokenizer)
    text_unit = "text" if text_meta else "text_chars"
    writers = {"validation": _ShardWriter(tmp, "validation", n_val, cfg),
               "train": _ShardWriter(tmp, "train", len(items) - n_val, cfg)}
    # A latent modality's count is of latents (its positions depend on the model's patch size).
    counted = [text_unit, *(f"{m}_latents" if m in latents else m for m in modalities[1:])]
    tokens = {split: {m: 0 for m in counted} for split in writers}
    hf = (cfg.hf_dataset, cfg.hf_split, cfg.image_column) if cfg.hf_dataset else None
    rows = encode_all(planned, tmp, tokenizers, latents, hf, cfg.num_workers, cfg.chunk_size)
    for k, row in enumerate(tqdm(rows, total=len(planned), desc="encode", disable=not cfg.progress)):
        if isinstance(row, str):
            if not cfg.skip_bad:
                raise BadInput(row)
            skipped.append(row)
            continue
        split = "validation" if k < n_val else "train"
        for seg in row["segments"]:
            if seg["modality"] == "text":
                tokens[split][text_unit] += count_text(seg["text"])
            elif seg["modality"] in latents:
                tokens[split][f"{seg['modality']}_latents"] += 1
            else:
                tokens[split][seg["modality"]] += len(seg["tokens"])
        writers[split].add(row)
    files = {split: w.close() for split, w in writers.items()}
    if cfg.progress:  # timings go to the console, not meta.json (which stays deterministic)
        encoded = time.perf_counter() - fitted
        print(f"fit {fitted - start:.1f} s; encode+write {encoded:.1f} s ({len(planned) / encoded:.1f} items/s "
              f"with --num-workers {cfg.num_workers})", file=sys.stderr)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                if k not in ("out", "force", "progress", "num_workers")}
    meta = {
        "format": FORMAT,
        "modalities": modalities,
        "codebook_sizes": {m: tokenizers[m]["codebook_size"] for m in modalities[1:] if m in tokenizers},
        "text_tokenizer": text_meta,
        "tokenizers": tokenizers,
        "splits": {split: w.rows for split, w in writers.items()},
        "files": files,
        "tokens": tokens,
        "skipped": {"count": len(skipped), "first": skipped[:20]},
        "settings": settings,
    }
    if latents:
        meta["latents"] = latents
    else:  # a discrete dataset's meta.json is what it always was
        for key in ("image_encoder", "vae_dir", "latent_dtype"):
            del settings[key]
    return meta

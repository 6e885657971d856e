"""Stateful, rank-split HuggingFace dataset of multimodal samples, packed into windows.

A row is `{"segments": [{"modality": "text", "text": ...}, {"modality": "image",
"tokens": [...]}, ...]}`; it becomes `[bos] + segments + [eos]` in unified ids and is packed
greedily into `seq_len + 1` windows exactly like torchtitan's `HuggingFaceTextDataset`, so
the eos-based document masks of flex/varlen attention apply unchanged.

With diffusion modalities (the Transfusion setting) a latent segment `{"modality": "image",
"latent": ...}` becomes BOI, one position per latent patch (holding the BOI id as a
placeholder) and EOI, and each window also carries the clean patches, their noise and
timestep and the image index of every latent position (see `MultimodalDataset`).
"""

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, IterableDataset as HFIterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from datasets.distributed import split_dataset_by_node
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

from torchtitan_mot.config import ConfigError
from torchtitan_mot.model.patches import patchify

from .latents import DiffusionWindows, read_latent
from .meta import check_meta, looks_local, meta_latents, missing_dataset, read_meta
from .tokenizer import TEXT, MultimodalTokenizer

ROW_COLUMN = "__mot_row__"
_FILE_BUILDERS = (("jsonl", "json"), ("json", "json"), ("parquet", "parquet"))


class BadSampleError(ValueError):
    """A malformed row; skippable with `[mot].skip_bad_samples`, unlike config errors."""


class ShardedParquetStream:
    """Streaming reader of a split's parquet shards that never reads a row twice.

    The unit of work is a parquet row group. Rank `r` of `R` owns units `r::R`; DataLoader
    worker `w` of `W` on that rank owns the rank's units `w::W`. Each reader decodes only its
    own row groups, whatever the shard count (HuggingFace's `split_dataset_by_node` instead has
    every rank read every row and keep 1/R when the shard count is not a multiple of R).
    Position (epoch, unit, row) is its resumable state.
    """

    def __init__(self, files: list[Path], rank: int, world_size: int) -> None:
        units, first = [], 0
        for path in files:
            meta = pq.ParquetFile(path).metadata  # the footer only
            for group in range(meta.num_row_groups):
                n = meta.row_group(group).num_rows
                units.append((str(path), group, first, n))
                first += n
        if len(units) < world_size:
            raise ValueError(
                f"{files[0].parent}: {len(units)} parquet row groups cannot feed {world_size} "
                "data-parallel ranks; prepare the dataset with a smaller --row-group-rows"
            )
        self._rank_units = units[rank::world_size]
        self.epoch = 0
        self._unit, self._row = 0, 0

    def reader_units(self) -> list[tuple[str, int, int, int]]:
        """(file, row group, global index of its first row, rows) this reader owns."""
        worker = get_worker_info()
        if worker is None or worker.num_workers == 1:
            return self._rank_units
        return self._rank_units[worker.id :: worker.num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        units = self.reader_units()
        while self._unit < len(units):
            path, group, first, _ = units[self._unit]
            table = pq.ParquetFile(path).read_row_group(group, columns=["segments"])
            start = self._row
            for i, row in enumerate(table.slice(start).to_pylist(), start=start):
                self._row = i + 1
                row[ROW_COLUMN] = first + i
                yield row
            self._unit, self._row = self._unit + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._unit, self._row = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "unit": self._unit, "row": self._row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._unit, self._row = state["epoch"], state["unit"], state["row"]


# What `datasets` raises for a truncated, corrupt or unreadable data file; none names the file.
_UNREADABLE = (DatasetGenerationError, pa.ArrowInvalid, OSError)


def _unreadable(source: str, error: Exception) -> ValueError:
    cause = error.__cause__ or error
    return ValueError(f"{source}: unreadable data file ({type(cause).__name__}: {cause})")


def load_split(
    dataset_path: str, split: str, streaming: bool, modalities: list[str], codebook_sizes: list[int],
    dp_rank: int = 0, dp_world_size: int = 1,
) -> tuple[Dataset | HFIterableDataset | ShardedParquetStream, str]:
    """Load this rank's part of one split from a local directory (checked against
    meta.json) or a hub name.

    Returns the data with a global row-index column (for error messages) and a
    human-readable source name.
    """
    root = Path(dataset_path)
    if root.is_dir():
        meta = root / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} is missing: a MoT dataset directory needs meta.json")
        check_meta(meta, modalities, codebook_sizes)
        shards = read_meta(meta).get("files", {}).get(split)
        if shards is not None:
            return _load_shards(root, split, [root / f for f in shards], streaming, dp_rank, dp_world_size)
        for ext, builder in _FILE_BUILDERS:
            data_file = root / f"{split}.{ext}"
            if data_file.is_file():
                break
        else:
            raise FileNotFoundError(f"no {split}.jsonl/.json/.parquet in {root}")
        source = str(data_file)
        if data_file.stat().st_size == 0:
            # (HuggingFace's json builder raises a bare StopIteration on an empty file.)
            raise ValueError(f"{source} has no rows")
        if streaming and ext == "json":
            # datasets 5.2 streams a JSON array's mixed-field segments as undecoded strings.
            raise ValueError(
                f"{source}: mot.streaming cannot read a .json file; write {split}.jsonl or "
                "parquet shards (python -m torchtitan_mot.data.prepare), or set "
                "mot.streaming = false"
            )
        try:
            ds = load_dataset(builder, data_files={split: source}, split=split, streaming=streaming)
        except _UNREADABLE as e:
            raise _unreadable(source, e) from e
    elif looks_local(dataset_path):
        raise FileNotFoundError(missing_dataset(dataset_path, "dataset path"))
    else:
        try:
            ds = load_dataset(dataset_path, split=split, streaming=streaming)
        except (ConnectionError, DatasetNotFoundError) as e:
            raise ConfigError(
                f"dataset path {dataset_path}: not a local folder and not reachable on the Hub "
                f"({type(e).__name__}: {e})"
            ) from None
        source = f"{dataset_path}[{split}]"
    if isinstance(ds, Dataset):
        ds = ds.add_column(ROW_COLUMN, range(len(ds)))
    else:
        ds = ds.map(lambda _, idx: {ROW_COLUMN: idx}, with_indices=True)
    return split_dataset_by_node(ds, rank=dp_rank, world_size=dp_world_size), source


def _load_shards(
    root: Path, split: str, files: list[Path], streaming: bool, dp_rank: int, dp_world_size: int
) -> tuple[Dataset | ShardedParquetStream, str]:
    """The parquet shards meta.json lists for `split` (written by `torchtitan_mot.data.prepare`)."""
    source = str(root / split)
    if not files:
        raise FileNotFoundError(f"{root / 'meta.json'} lists no {split} shards")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{root / 'meta.json'} lists {split} shards that are missing: {missing[:3]}")
    try:
        if streaming:
            return ShardedParquetStream(files, dp_rank, dp_world_size), source
        ds = load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
    except _UNREADABLE as e:
        raise _unreadable(source, e) from e
    ds = ds.add_column(ROW_COLUMN, range(len(ds)))
    return split_dataset_by_node(ds, rank=dp_rank, world_size=dp_world_size), source


class _Image:
    """A latent image in the packing buffer: its first position (relative to the buffer
    start, negative once a window edge has cut it), clean patches, noise and t."""

    __slots__ = ("start", "patches", "noise", "t")

    def __init__(self, start: int, patches: np.ndarray, noise: np.ndarray, t: int) -> None:
        self.start, self.patches, self.noise, self.t = start, patches, noise, t

    def state(self) -> tuple[int, np.ndarray, np.ndarray, int]:
        return self.start, self.patches, self.noise, self.t


class MultimodalDataset(IterableDataset, Stateful):
    """Yields `({"input", "modality_ids"}, labels)` windows; resumable via `state_dict`.

    With `diffusion` (the config has diffusion modalities) the input dict also holds, for
    `seq_len` positions: `patches` and `noise` (seq, C*p*p) float32 (clean latent patch x0
    and epsilon at latent positions, 0 elsewhere), `timesteps` (seq,) int64 (the image's t,
    0 elsewhere) and `image_ids` (seq,) int64 (index of the image within the window in order
    of appearance, -1 elsewhere; a part cut by a window edge is its own image); labels are
    IGNORE_INDEX where the input is BOI or a latent position.

    State = position in this rank's data + the packing buffer, so a resumed run sees exactly
    the tokens an uninterrupted run would. With DataLoader workers, map-style data is split
    further per worker (each worker's state is saved by StatefulDataLoader); streaming parquet
    shards are split per worker by `ShardedParquetStream` (whole row groups), other streaming
    data by `datasets` itself (by file shard).
    """

    def __init__(
        self,
        dataset_path: str,
        split: str,
        tokenizer: MultimodalTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        streaming: bool = False,
        skip_bad_samples: bool = False,
        infinite: bool = False,
        diffusion: DiffusionWindows | None = None,
    ) -> None:
        layout = tokenizer.layout
        self._data, self.source = load_split(
            dataset_path, split, streaming, list(layout.modalities), list(layout.codebook_sizes),
            dp_rank, dp_world_size,
        )
        self.diffusion = diffusion
        self._latents = self._latent_specs(dataset_path, layout, diffusion)
        self._dataset_path, self._split = dataset_path, split
        self._shards: list[tuple[str, int]] | None = None  # (file, its first row), read on the first bad row
        self._tokenizer = tokenizer
        self._modality_table = layout.token_modality_table()
        self.seq_len = seq_len
        self.skip_bad_samples = skip_bad_samples
        self.infinite = infinite
        self._split_per_worker = False

        self._sample_idx = 0
        self._token_buffer: list[int] = []
        self._bad_samples = 0
        self._epoch = 0
        self._image_buffer: list[_Image] = []
        self._patch_dim = next((s[0] * diffusion.patch_size**2 for s, _ in self._latents.values()), 0)
        # Labels are IGNORE_INDEX where the input is a latent modality's BOI (latent positions hold it too).
        self._ignored_inputs = torch.zeros(layout.vocab_size, dtype=torch.bool)
        for name in self._latents:
            self._ignored_inputs[layout.begin_id(name)] = True

    @staticmethod
    def _latent_specs(
        dataset_path: str, layout: Any, diffusion: DiffusionWindows | None
    ) -> dict[str, tuple[tuple[int, int, int], str]]:
        """{latent modality: (shape, dtype)} from meta.json, checked against the diffusion
        settings; what cannot work is refused here, before any row is read."""
        latent = set(layout.latent_modalities)
        wanted = set(diffusion.modalities) if diffusion else set()
        if latent != wanted:
            raise ConfigError(
                f"{dataset_path}: modalities stored as latents {sorted(latent)} must be exactly "
                f"mot.diffusion_modalities {sorted(wanted)}"
            )
        if not wanted:
            return {}
        meta = Path(dataset_path) / "meta.json"
        if not meta.is_file():
            raise ConfigError(f"mot.diffusion_modalities needs a local dataset with meta.json; {meta} is missing")
        specs = {}
        for name, entry in meta_latents(meta).items():
            shape = tuple(entry["shape"])
            p = diffusion.patch_size
            if p < 1 or shape[1] % p or shape[2] % p:
                raise ConfigError(
                    f"mot.diffusion_patch_size {p} does not cut the {name!r} latents of {meta} "
                    f"(shape [C, H, W] = {list(shape)}) into whole patches"
                )
            specs[name] = (shape, entry["dtype"])
        dims = {s[0] * diffusion.patch_size ** 2 for s, _ in specs.values()}
        if len(dims) > 1:
            raise ConfigError(f"{meta}: the diffusion modalities' patches differ in size {sorted(dims)} (C * p * p)")
        return specs

    def _bad(self, row: Any, problem: str) -> BadSampleError:
        return BadSampleError(f"{self.source}: row {row}{self._shard_of(row)}: {problem}")

    def _shard_of(self, row: Any) -> str:
        """' (<shard file> row <i>)' for a row of parquet shards (rows are numbered across them)."""
        if self._shards is None:
            root = Path(self._dataset_path)
            files = read_meta(root / "meta.json").get("files", {}).get(self._split) if root.is_dir() else None
            self._shards, first = [], 0
            for name in files or []:
                self._shards.append((str(root / name), first))
                first += pq.ParquetFile(root / name).metadata.num_rows
        for path, first in reversed(self._shards):
            if int(row) >= first:
                return f" ({path} row {int(row) - first})"
        return ""

    def encode_sample(self, row: Any, sample: dict[str, Any]) -> list[int]:
        """`[bos] + segments + [eos]` in unified ids; BadSampleError names row and field."""
        return self._encode(row, sample)[0]

    def _order(self, row: Any, segments: list[Any]) -> tuple[list[Any], list[int]]:
        """A one-caption, one-latent-image row in the order drawn with `caption_first_prob`
        (whatever order it was stored in); other rows as stored. Also the original index of
        each segment, for error messages."""
        index = list(range(len(segments)))
        if self.diffusion is None or len(segments) != 2:
            return segments, index
        kinds = [s.get("modality") if isinstance(s, dict) else None for s in segments]
        if TEXT not in kinds or not any(k in self._latents for k in kinds):
            return segments, index
        caption_first = self.diffusion.caption_first(self._epoch, int(row))
        if (kinds[0] == TEXT) != caption_first:
            return segments[::-1], index[::-1]
        return segments, index

    def _encode(self, row: Any, sample: dict[str, Any]) -> tuple[list[int], list[_Image]]:
        """Unified ids of a row and its latent images (start = position within the ids)."""
        tok, layout = self._tokenizer, self._tokenizer.layout
        segments = sample.get("segments")
        if segments is None:
            raise self._bad(row, "missing field 'segments'")
        if not isinstance(segments, list) or not segments:
            raise self._bad(row, "'segments' must be a non-empty list")
        segments, original = self._order(row, segments)
        ids = [tok.bos_id]
        images: list[_Image] = []
        # An image before the row's first text precedes its caption (the t cap's case).
        first_text = next((k for k, s in enumerate(segments) if isinstance(s, dict) and s.get("modality") == TEXT),
                          None)
        for k, (j, seg) in enumerate(zip(original, segments)):
            where = f"segments[{j}]"
            if not isinstance(seg, dict):
                raise self._bad(row, f"{where} must be an object, got {type(seg).__name__}")
            modality = seg.get("modality")
            if modality is None:
                raise self._bad(row, f"{where}: missing field 'modality'")
            if modality not in layout.modalities:
                raise self._bad(
                    row,
                    f"{where}.modality: unknown modality {modality!r}, "
                    f"[mot].modalities is {list(layout.modalities)}",
                )
            if modality in self._latents:
                image_first = first_text is not None and k < first_text
                images.append(self._latent_image(row, where, seg, modality, len(ids) + 1, len(images), image_first))
                n = len(images[-1].patches)
                ids += [layout.begin_id(modality)] * (n + 1) + [layout.end_id(modality)]
                continue
            field = "text" if modality == TEXT else "tokens"
            value = seg.get(field)
            if value is None:
                raise self._bad(row, f"{where}: missing field '{field}' for a {modality!r} segment")
            expected = str if modality == TEXT else (list, tuple)
            if not isinstance(value, expected):
                kind = "a string" if modality == TEXT else "a list of token ids"
                raise self._bad(row, f"{where}.{field} must be {kind}, got {type(value).__name__}")
            if len(value) == 0:
                raise self._bad(row, f"{where}.{field}: empty {modality!r} segment")
            try:
                ids += tok.encode_segment(modality, **{field: value})
            except (ValueError, TypeError) as e:
                raise self._bad(row, f"{where}.{field}: {e}") from None
        ids.append(tok.eos_id)
        return ids, images

    def _latent_image(self, row: Any, where: str, seg: dict[str, Any], modality: str, start: int,
                      index: int, image_first: bool) -> _Image:
        """A latent segment's patches, with the noise and t of image `index` of the row."""
        assert self.diffusion is not None
        shape, dtype = self._latents[modality]
        if seg.get("tokens") is not None:
            raise self._bad(row, f"{where}: a {modality!r} segment holds a latent (diffusion modality), not 'tokens'")
        try:
            latent = read_latent(seg, shape, dtype)
        except ValueError as e:
            raise self._bad(row, f"{where}.latent: {e}") from None
        patches = patchify(torch.from_numpy(latent), self.diffusion.patch_size).numpy()
        t, noise = self.diffusion.draw(self._epoch, int(row), index, len(patches), patches.shape[1], image_first)
        return _Image(start, patches, noise, t)

    def _rows(self) -> Iterator[dict[str, Any]]:
        if isinstance(self._data, Dataset):
            worker = get_worker_info()
            if worker is not None and worker.num_workers > 1 and not self._split_per_worker:
                self._data = split_dataset_by_node(self._data, rank=worker.id, world_size=worker.num_workers)
                self._split_per_worker = True
            if self._sample_idx >= len(self._data):
                return iter([])
            return iter(self._data.skip(self._sample_idx))
        return self._read_streaming()

    def _read_streaming(self) -> Iterator[dict[str, Any]]:
        """Streaming reads the file lazily, so a corrupt file surfaces mid-run: name it."""
        try:
            yield from self._data
        except _UNREADABLE as e:
            raise _unreadable(self.source, e) from e

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        window = self.seq_len + 1
        empty_passes = 0
        while True:
            empty_passes += 1
            for sample in self._rows():
                self._sample_idx += 1
                try:
                    if self.diffusion is None:
                        ids, images = self.encode_sample(sample[ROW_COLUMN], sample), []
                    else:
                        ids, images = self._encode(sample[ROW_COLUMN], sample)
                except BadSampleError as e:
                    if not self.skip_bad_samples:
                        raise
                    self._bad_samples += 1
                    logger.warning(f"Skipped bad sample ({self._bad_samples} so far): {e}")
                    continue
                empty_passes = 0
                for image in images:
                    image.start += len(self._token_buffer)
                self._image_buffer += images
                self._token_buffer.extend(ids)
                while len(self._token_buffer) >= window:
                    x = torch.tensor(self._token_buffer[:window], dtype=torch.long)
                    self._token_buffer = self._token_buffer[window:]
                    inputs = x[:-1]
                    batch = {"input": inputs, "modality_ids": self._modality_table[inputs]}
                    if self.diffusion is None:
                        yield batch, x[1:]
                        continue
                    labels = x[1:].masked_fill(self._ignored_inputs[inputs], IGNORE_INDEX)
                    yield {**batch, **self._latent_window(window)}, labels

            if self._bad_samples:
                logger.warning(f"{self.source}: {self._bad_samples} bad samples skipped so far")
            if not self.infinite:
                logger.warning(f"Dataset {self.source} has run out of data")
                break
            if empty_passes == 2:
                # A whole pass gave no usable sample (e.g. a DataLoader worker without a file
                # shard, or every row skipped as bad): stop instead of re-looping forever.
                logger.warning(f"Dataset {self.source} has no samples for this rank/worker")
                break
            self._sample_idx = 0
            self._epoch += 1
            logger.warning(f"Dataset {self.source} is being re-looped")
            if not isinstance(self._data, Dataset):
                # A new epoch makes `datasets` ignore the resume state it was loaded with.
                self._data.set_epoch(self._data.epoch + 1)

    def _latent_window(self, window: int) -> dict[str, torch.Tensor]:
        """The latent tensors of the window just cut from the buffer front (`window` ids, the
        first `seq_len` of them inputs); images left for later windows are shifted."""
        seq, dim = self.seq_len, self._patch_dim
        patches, noise = torch.zeros(seq, dim), torch.zeros(seq, dim)
        timesteps, image_ids = torch.zeros(seq, dtype=torch.long), torch.full((seq,), -1, dtype=torch.long)
        k = 0
        for image in self._image_buffer:
            a = image.start
            lo, hi = max(a, 0), min(a + len(image.patches), seq)
            if lo < hi:
                patches[lo:hi] = torch.from_numpy(image.patches[lo - a : hi - a])
                noise[lo:hi] = torch.from_numpy(image.noise[lo - a : hi - a])
                timesteps[lo:hi], image_ids[lo:hi] = image.t, k
                k += 1
            image.start -= window
        self._image_buffer = [im for im in self._image_buffer if im.start + len(im.patches) > 0]
        return {"patches": patches, "noise": noise, "timesteps": timesteps, "image_ids": image_ids}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"token_buffer": list(self._token_buffer), "bad_samples": self._bad_samples}
        if self.diffusion is not None:
            state["epoch"] = self._epoch
            state["images"] = [im.state() for im in self._image_buffer]
        if isinstance(self._data, Dataset):
            state["sample_idx"] = self._sample_idx
        else:
            state["data"] = self._data.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._token_buffer = list(state_dict["token_buffer"])
        self._bad_samples = state_dict["bad_samples"]
        if self.diffusion is not None:
            self._epoch = state_dict["epoch"]
            self._image_buffer = [_Image(*s) for s in state_dict["images"]]
        if isinstance(self._data, Dataset):
            self._sample_idx = state_dict["sample_idx"]
        else:
            # `datasets` ignores a resume state from another epoch and does not restore the
            # epoch itself: set it first, or a checkpoint taken after a re-loop restarts the data.
            self._data.set_epoch(state_dict["data"]["epoch"])
            self._data.load_state_dict(state_dict["data"])

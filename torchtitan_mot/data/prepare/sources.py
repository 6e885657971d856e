"""Input listings: caption / transcript files, text documents, HuggingFace datasets.

Scanning only reads the listing files (cheap) and checks what can be checked there (syntax,
fields, empty text, missing media files); decoding media happens later, per item, in
`encode.py`. Every `Item` carries its origin (`file:line` or `dataset[split] row i`) so any
later error names it.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tokenizers import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass(frozen=True)
class Item:
    """One sample to build: a caption/transcript with its media, or a text-only document."""

    modality: str  # "image", "speech" or "text" (text-only document)
    origin: str
    text: str
    media: str | int | None = None  # file path, or row index into the HF dataset


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) from a .jsonl or .csv listing; line numbers are 1-based."""
    if not path.is_file():
        raise BadInput(f"{path}: listing file does not exist")
    records = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                records.append((reader.line_num, row))
        return records
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise BadInput(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    return records


def scan_media(
    root: Path, listing: Path, modality: str, suffixes: tuple[str, ...], skip_bad: bool, skipped: list[str]
) -> list[Item]:
    """Items from `listing` ({"file": path relative to `root`, "text": ...} per line/row)."""
    if not root.is_dir():
        raise BadInput(f"{root}: not a directory")
    items = []
    for line_no, record in _records(listing):
        origin = f"{listing}:{line_no}"
        try:
            for field in ("file", "text"):
                if not isinstance(record.get(field), str):
                    raise BadInput(f"{origin}: field {field!r} missing or not a string")
            if not record["text"].strip():
                raise BadInput(f"{origin}: empty text for {record['file']}")
            path = root / record["file"]
            if path.suffix.lower() not in suffixes:
                raise BadInput(f"{origin}: {record['file']} is not a {modality} file ({', '.join(suffixes)})")
            if not path.is_file():
                raise BadInput(f"{origin}: {modality} file {path} does not exist")
        except BadInput as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        items.append(Item(modality, f"{origin} ({record['file']})", record["text"], str(path)))
    return items


def scan_text_docs(path: Path, skip_bad: bool, skipped: list[str]) -> list[Item]:
    """Text-only documents: jsonl {"text": ...} per line, or .txt (blank-line separated)."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise BadInput(f"{path}: listing file does not exist")
        items, block, start = [], [], 1
        lines = path.read_text(encoding="utf-8").splitlines()
        for line_no, line in enumerate(lines + [""], start=1):
            if line.strip():
                if not block:
                    start = line_no
                block.append(line)
            elif block:
                items.append(Item("text", f"{path}:{start}", "\n".join(block)))
                block = []
        return items
    items = []
    for line_no, record in _records(path):
        origin = f"{path}:{line_no}"
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            error = BadInput(f"{origin}: field 'text' missing, empty or not a string")
            if not skip_bad:
                raise error
            skipped.append(str(error))
            continue
        items.append(Item("text", origin, text))
    return items


def open_hf_dataset(name: str, split: str, image_column: str) -> Any:
    """A local dataset directory (`save_to_disk`, imagefolder, parquet...) or a hub name,
    with the image column left undecoded so unreadable images are reported per row."""
    from datasets import Image, load_dataset, load_from_disk

    path = Path(name)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict
            ds = ds[split]
    else:
        ds = load_dataset(name, split=split)
    if image_column not in ds.column_names:
        raise BadInput(f"{name}[{split}]: no column {image_column!r} (--image-column); columns: {ds.column_names}")
    return ds.cast_column(image_column, Image(decode=False))


def scan_hf(name: str, split: str, image_column: str, text_column: str, skip_bad: bool, skipped: list[str]) -> list[Item]:
    ds = open_hf_dataset(name, split, image_column)
    if text_column not in ds.column_names:
        raise BadInput(f"{name}[{split}]: no column {text_column!r} (--text-column); columns: {ds.column_names}")
    items = []
    for i, text in enumerate(ds[text_column]):
        origin = f"{name}[{split}] row {i}"
        if not isinstance(text, str) or not text.strip():
            error = BadInput(f"{origin}: empty or missing {text_column!r}")
            if not skip_bad:
                raise error
            skipped.append(str(error))
            continue
        items.append(Item("image", origin, text, i))
    return items

"""Copies of a prepared dataset for runs that compare layouts (tests, feature matrix, GPU acceptance)."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def repeated_dataset(src: Path, dst: Path, copies: int = 1, jsonl: bool = False) -> Path:
    """`src` (a dataset written by `torchtitan_mot.data.prepare`) with its train rows written
    `copies` times, as one parquet shard, or as `train.jsonl` / `validation.jsonl` with
    `jsonl` (for tests that corrupt a text file). Map-style data-parallel ranks read
    contiguous blocks, so each of `copies` ranks then reads exactly what one process reads.
    Codebook files come along, so the copy's tokenizers still load."""
    meta = json.loads((Path(src) / "meta.json").read_text())
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in meta.get("tokenizers", {}).values():
        for name in entry["files"].values():
            shutil.copy(Path(src) / name, dst / name)
    files = meta.pop("files")
    tables = {split: pa.concat_tables([pq.read_table(Path(src) / f) for f in names]) for split, names in files.items()}
    tables["train"] = pa.concat_tables([tables["train"]] * copies)
    meta["splits"] = {split: t.num_rows for split, t in tables.items()}
    if jsonl:
        for split, table in tables.items():
            with open(dst / f"{split}.jsonl", "w") as f:
                for row in table.to_pylist():
                    segments = [{k: v for k, v in seg.items() if v is not None} for seg in row["segments"]]
                    f.write(json.dumps({"segments": segments}) + "\n")
    else:
        meta["files"] = {}
        for split, table in tables.items():
            (dst / split).mkdir(exist_ok=True)
            name = f"{split}/part-00000-of-00001.parquet"
            pq.write_table(table, dst / name)
            meta["files"][split] = [name]
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def dataset_of_rows(src: Path, dst: Path, rows: list[int]) -> Path:
    """`src`'s train rows `rows` (indices across its shards, in that order) as a one-shard
    dataset with the same meta.json (and validation split)."""
    meta = json.loads((Path(src) / "meta.json").read_text())
    files = meta.pop("files")
    train = pa.concat_tables([pq.read_table(Path(src) / f) for f in files["train"]]).take(rows)
    dst = Path(dst)
    meta["files"] = {}
    for split, table in (("train", train),
                         *((s, pa.concat_tables([pq.read_table(Path(src) / f) for f in names]))
                           for s, names in files.items() if s != "train")):
        (dst / split).mkdir(parents=True, exist_ok=True)
        name = f"{split}/part-00000-of-00001.parquet"
        pq.write_table(table, dst / name)
        meta["files"][split] = [name]
        meta["splits"][split] = table.num_rows
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def dataset_rows(src: Path, split: str) -> list[dict]:
    """The rows of a prepared dataset's split, in order across its shards."""
    meta = json.loads((Path(src) / "meta.json").read_text())
    return pa.concat_tables([pq.read_table(Path(src) / f) for f in meta["files"][split]]).to_pylist()

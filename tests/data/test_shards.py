"""The loader on prepare's sharded parquet: meta.json defaults, map-style / streaming, resume,
and the explicit row-group assignment that keeps every row read exactly once."""

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import torchtitan_mot.data.dataset as dataset_module
from test_dataloader import TOKENIZER, assert_same, rows_seen
from torchtitan_mot.config import ConfigError, load_job_config
from torchtitan_mot.data.dataloader import build_mot_dataloader
from torchtitan_mot.data.dataset import MultimodalDataset
from torchtitan_mot.data.prepare.build import SCHEMA
from torchtitan_mot.data.tokenizer import build_mot_tokenizer


def write_shards(root: Path, n_rows: int, n_shards: int, group_rows: int) -> Path:
    """A prepare-style dataset: row i is `"row i"` + random image ids, in `n_shards` files."""
    rng = random.Random(0)
    files = []
    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
    bounds = [round(k * n_rows / n_shards) for k in range(n_shards + 1)]
    for k in range(n_shards):
        rows = []
        for i in range(bounds[k], bounds[k + 1]):
            segs = [{"modality": "text", "text": f"row {i}", "tokens": None},
                    {"modality": "image", "text": None, "tokens": [rng.randrange(64) for _ in range(rng.randint(1, 20))]}]
            rows.append({"segments": segs[:: rng.choice([1, -1])]})
        name = f"train/part-{k:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / name, row_group_size=group_rows)
        files.append(name)
    pq.write_table(pa.Table.from_pylist(rows[:4], schema=SCHEMA), root / "validation" / "part-00000-of-00001.parquet")
    meta = {"modalities": ["text", "image"], "codebook_sizes": {"image": 64},
            "files": {"train": files, "validation": ["validation/part-00000-of-00001.parquet"]}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def config(dataset: Path, *extra: str):
    """No [mot].modalities / codebook_sizes: they come from meta.json."""
    return load_job_config([
        "--model.hf_assets_path", TOKENIZER,
        "--training.dataset_path", str(dataset), "--training.seq_len", "32", "--training.local_batch_size", "2",
        *extra,
    ])


def test_modalities_from_meta_and_conflicts(tmp_path: Path) -> None:
    ds = write_shards(tmp_path / "ds", 20, 2, 5)
    cfg = config(ds)
    tok = build_mot_tokenizer(cfg)
    assert cfg.mot.modalities == ["text", "image"] and cfg.mot.codebook_sizes == [64]
    assert tok.layout.codebook_sizes == (64,)
    with pytest.raises(ConfigError, match=r"declares codebook_sizes \{'image': 64\} but the config has "
                       r".*: pass --mot.codebook_sizes 64 "):
        config(ds, "--mot.modalities", "text,image", "--mot.codebook_sizes", "256")
    with pytest.raises(ConfigError, match=r"\[mot\].codebook_sizes is set to \[64\] but \[mot\].modalities is not"):
        config(ds, "--mot.codebook_sizes", "64")
    with pytest.raises(ConfigError, match=r"nor \[validation\].dataset_path \(None\) has a meta.json"):
        config(tmp_path)  # a folder, but no meta.json
    with pytest.raises(ConfigError, match=rf"--training.dataset_path {tmp_path / 'nowhere'}: no such folder"):
        config(tmp_path / "nowhere")


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_every_row_once_and_resume(tmp_path: Path, streaming: bool) -> None:
    ds = write_shards(tmp_path / "ds", 30, 3, 4)
    cfg = config(ds, *(["--mot.streaming"] if streaming else []))
    tok = build_mot_tokenizer(cfg)
    for workers in ("0", "2"):  # real DataLoader worker processes split the shards too
        one = config(ds, "--training.dataloader.num_workers", workers, *(["--mot.streaming"] if streaming else []))
        seen = Counter(rows_seen(tok, list(build_mot_dataloader(1, 0, tok, one, infinite=False))))
        assert set(seen) <= set(range(30)) and max(seen.values()) == 1 and len(seen) > 15, (workers, seen)

    ref = list(itertools.islice(build_mot_dataloader(1, 0, tok, cfg), 30))  # crosses epochs
    loader = build_mot_dataloader(1, 0, tok, cfg)
    first = list(itertools.islice(loader, 11))
    state = loader.state_dict()
    resumed = build_mot_dataloader(1, 0, tok, cfg)
    resumed.load_state_dict(state)
    assert_same(ref, first + list(itertools.islice(resumed, 19)))


@pytest.mark.parametrize("n_shards,group_rows", [(8, 8), (5, 4), (3, 7)])
def test_streaming_4_ranks_2_workers_read_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_shards: int, group_rows: int
) -> None:
    """Counts the rows every (rank, worker) reader decodes from parquet: their sum is the
    dataset (no read amplification) and each reader decodes exactly the rows it yields."""
    n_rows, ranks, workers = 120, 4, 2
    ds = write_shards(tmp_path / "ds", n_rows, n_shards, group_rows)
    cfg = config(ds)
    tok = build_mot_tokenizer(cfg)
    decoded: Counter[tuple[int, int]] = Counter()
    reader = (0, 0)
    read_row_group = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        table = read_row_group(self, i, *args, **kwargs)
        decoded[reader] += table.num_rows
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    yielded: dict[tuple[int, int], list[int]] = {}
    for rank, worker in itertools.product(range(ranks), range(workers)):
        reader = (rank, worker)
        info = type("WorkerInfo", (), {"id": worker, "num_workers": workers})()
        monkeypatch.setattr(dataset_module, "get_worker_info", lambda: info)
        data = MultimodalDataset(str(ds), "train", tok, 32, rank, ranks, streaming=True)
        yielded[reader] = [row[dataset_module.ROW_COLUMN] for row in data._data]
    assert sum(decoded.values()) == n_rows
    all_rows = sorted(r for rows in yielded.values() for r in rows)
    assert all_rows == list(range(n_rows))
    assert all(decoded[k] == len(v) for k, v in yielded.items())
    assert sum(1 for v in yielded.values() if v) == min(8, -(-n_rows // group_rows))

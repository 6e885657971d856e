"""Packing, per-row validation and the demo image tokenizer."""

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from torchtitan_mot.data.dataset import BadSampleError, MultimodalDataset
from torchtitan_mot.data.tokenizer import MultimodalTokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "assets" / "tokenizer")
MODALITIES = ["text", "image", "speech"]
SIZES = [256, 64]


def random_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        segments = [{"modality": "text", "text": f"row {i} " + rng.choice(["seven", "a digit", "zebra"])}]
        for m, size in zip(MODALITIES[1:], SIZES):
            if rng.random() < 0.7:
                segments.append({"modality": m, "tokens": [rng.randrange(size) for _ in range(rng.randint(1, 40))]})
        rng.shuffle(segments)
        rows.append({"segments": segments})
    return rows


def write_dataset(root: Path, rows: list[Any], split: str = "train", meta: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = meta or {"modalities": MODALITIES, "codebook_sizes": dict(zip(MODALITIES[1:], SIZES))}
    (root / "meta.json").write_text(json.dumps(meta))
    with open(root / f"{split}.jsonl", "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return root


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    return MultimodalTokenizer(TOKENIZER, MODALITIES, SIZES)


def stream_of(windows: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> list[int]:
    """Undo the packing: each window is S inputs plus one final label."""
    out: list[int] = []
    for x, y in windows:
        out += x["input"].tolist() + [int(y[-1])]
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_packing(tmp_path: Path, tok: MultimodalTokenizer, streaming: bool) -> None:
    rows = random_rows(60)
    ds = MultimodalDataset(str(write_dataset(tmp_path, rows)), "train", tok, seq_len=37, streaming=streaming)
    windows = list(ds)
    table = tok.layout.token_modality_table()
    for x, y in windows:
        assert x["input"].shape == x["modality_ids"].shape == y.shape == (37,)
        assert torch.equal(x["modality_ids"], table[x["input"]])
        assert torch.equal(x["input"][1:], y[:-1])
    stream = stream_of(windows)
    expected = [t for r in rows for t in ds.encode_sample(0, r)]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 38
    # eos closes a document and the next one starts with bos: the document masks see the samples.
    eos = [i for i, t in enumerate(stream) if t == tok.eos_id]
    assert all(stream[i + 1] == tok.bos_id for i in eos if i + 1 < len(stream))
    docs = np.split(np.array(stream), np.array(eos) + 1)
    for doc, row in zip(docs, rows):
        if len(doc) and doc[-1] == tok.eos_id:
            assert tok.decode_segments(doc.tolist()) == row["segments"]


def test_state_dict_resume(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    path = str(write_dataset(tmp_path, random_rows(30)))
    ref = list(MultimodalDataset(path, "train", tok, seq_len=16))
    ds = MultimodalDataset(path, "train", tok, seq_len=16)
    it = iter(ds)
    head = [next(it) for _ in range(5)]
    state = ds.state_dict()
    fresh = MultimodalDataset(path, "train", tok, seq_len=16)
    fresh.load_state_dict(state)
    assert stream_of(head + list(fresh)) == stream_of(ref)


def test_unreadable_meta_and_empty_split_are_named(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    path = write_dataset(tmp_path / "a", [GOOD])
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a/meta.json is not valid JSON"):
        MultimodalDataset(str(path), "train", tok, seq_len=8)
    empty = write_dataset(tmp_path / "b", [])
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"b/train.jsonl has no rows"):
            MultimodalDataset(str(empty), "train", tok, seq_len=8, streaming=streaming)


def test_meta_mismatch(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    bad = write_dataset(tmp_path / "a", [], meta={"modalities": ["text", "image"], "codebook_sizes": {"image": 256}})
    with pytest.raises(ValueError, match=r"meta.json declares modalities \['text', 'image'\].*\[mot\].modalities"):
        MultimodalDataset(str(bad), "train", tok, seq_len=8)
    bad = write_dataset(
        tmp_path / "b", [], meta={"modalities": MODALITIES, "codebook_sizes": {"image": 256, "speech": 65}}
    )
    with pytest.raises(ValueError, match=r"meta.json declares codebook_sizes .*65.*\[mot\].codebook_sizes"):
        MultimodalDataset(str(bad), "train", tok, seq_len=8)
    (tmp_path / "b" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        MultimodalDataset(str(tmp_path / "b"), "train", tok, seq_len=8)


GOOD = {"segments": [{"modality": "text", "text": "ok"}, {"modality": "image", "tokens": [1, 2]}]}
BAD_ROWS = [
    ({"segments": [{"modality": "video", "tokens": [1]}]}, r"segments\[0\].modality: unknown modality 'video'"),
    ({"segments": [{"modality": "text", "text": "x"}, {"modality": "image", "tokens": [3, 256]}]},
     r"segments\[1\].tokens: tokens\[1\]=256 is outside the 'image' codebook \[0, 256\)"),
    ({"segments": [{"modality": "speech", "tokens": [64]}]}, r"segments\[0\].tokens: tokens\[0\]=64 is outside the 'speech' codebook \[0, 64\)"),
    ({"segments": [{"modality": "image", "tokens": []}]}, r"segments\[0\].tokens: empty 'image' segment"),
    ({"segments": [{"modality": "text", "text": ""}]}, r"segments\[0\].text: empty 'text' segment"),
    ({"segments": []}, r"'segments' must be a non-empty list"),
    ({"other": 1}, r"missing field 'segments'"),
    ({"segments": [{"text": "x"}]}, r"segments\[0\]: missing field 'modality'"),
    ({"segments": [{"modality": "image"}]}, r"segments\[0\]: missing field 'tokens' for a 'image' segment"),
    ({"segments": [{"modality": "text"}]}, r"segments\[0\]: missing field 'text' for a 'text' segment"),
    ({"segments": [{"modality": "text", "text": 7}]}, r"segments\[0\].text must be a string, got int"),
    ({"segments": [{"modality": "text", "text": ["a", "b"]}]}, r"segments\[0\].text must be a string, got list"),
    ({"segments": [{"modality": "image", "tokens": "12"}]}, r"segments\[0\].tokens must be a list of token ids, got str"),
    ({"segments": [{"modality": "image", "tokens": ["a"]}]}, r"segments\[0\].tokens: "),
    ({"segments": "text"}, r"'segments' must be a non-empty list"),
]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("bad, match", BAD_ROWS)
def test_bad_rows(tmp_path: Path, tok: MultimodalTokenizer, bad: dict, match: str, streaming: bool) -> None:
    # The bad row sits between good ones: the error must name row 1, skipping must keep the rest.
    path = write_dataset(tmp_path, [GOOD, bad, GOOD])
    ds = MultimodalDataset(str(path), "train", tok, seq_len=4, streaming=streaming)
    with pytest.raises(BadSampleError, match=rf"train.jsonl: row 1: {match}"):
        list(ds)
    skipping = MultimodalDataset(str(path), "train", tok, seq_len=4, streaming=streaming, skip_bad_samples=True)
    stream = stream_of(list(skipping))
    good = skipping.encode_sample(0, GOOD)
    assert stream == (good + good)[: len(stream)]
    assert skipping.state_dict()["bad_samples"] == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_infinite_without_usable_samples_stops(tmp_path: Path, tok: MultimodalTokenizer, streaming: bool) -> None:
    path = write_dataset(tmp_path, [BAD_ROWS[0][0]] * 3)
    ds = MultimodalDataset(str(path), "train", tok, 4, streaming=streaming, skip_bad_samples=True, infinite=True)
    assert list(ds) == [] and ds.state_dict()["bad_samples"] == 6  # two passes, then it gives up


def test_demo_image_tokenizer_loads_from_the_dataset(tmp_path: Path) -> None:
    """The demo's image ids decode with the tokenizer its meta.json records (found through
    the dataset, also in a copy elsewhere), and re-encoding the decoded pixels gives the
    same ids, so the stored ids are this codebook's."""
    import pyarrow.parquet as pq
    from PIL import Image

    from torchtitan_mot.data.prepare import load_tokenizer
    from harness.data import repeated_dataset

    demo = repeated_dataset(ROOT / "assets" / "demo" / "text_image", tmp_path / "copy")
    codec = load_tokenizer(demo, "image")
    assert (codec.codebook_size, codec.tokens_per_item) == (256, 16)
    rows = pq.read_table(demo / "validation" / "part-00000-of-00001.parquet").to_pylist()
    stored = [np.array(s["tokens"]) for r in rows for s in r["segments"] if s["modality"] == "image"]
    assert len(stored) == 180
    pixels = [codec.decode(ids) for ids in stored]
    as_png = [Image.fromarray(np.round(p[..., 0] * 255).astype(np.uint8), "L") for p in pixels]
    assert all(np.array_equal(a, b) for a, b in zip(codec.encode(as_png), stored))


def test_repeated_dataset_copies_rows_in_either_format(tmp_path: Path) -> None:
    """The copy helper the parity tests rely on: train rows `copies` times in order, the
    validation split unchanged, and the jsonl form reads back as the same token stream."""
    from harness.data import repeated_dataset

    demo = ROOT / "assets" / "demo" / "text_image"
    tok2 = MultimodalTokenizer(TOKENIZER, ["text", "image"], [256])
    parquet = repeated_dataset(demo, tmp_path / "pq", copies=3)
    jsonl = repeated_dataset(demo, tmp_path / "jsonl", jsonl=True)
    assert json.loads((parquet / "meta.json").read_text())["splits"] == {"validation": 180, "train": 3 * 1617}
    assert len((jsonl / "train.jsonl").read_text().splitlines()) == 1617

    def stream(path: Path, split: str) -> list[int]:
        return stream_of(list(MultimodalDataset(str(path), split, tok2, seq_len=64)))

    once, thrice = stream(jsonl, "train"), stream(parquet, "train")
    assert thrice[: len(once)] == once and round(len(thrice) / len(once)) == 3
    assert stream(parquet, "validation") == stream(jsonl, "validation") == stream(demo, "validation")


def test_png_grid(tmp_path: Path) -> None:
    """The PNG decodes to the images side by side, in order, each a 100 px square (8 px
    nearest-upscaled), RGB as given and grey through the grey colormap, clipped to [0, 1]."""
    from PIL import Image

    from torchtitan_mot.generate import save_png_grid

    def squares(path: Path, colour: tuple[int, int, int]) -> tuple[int, list[int]]:
        """(pixel count, distinct 100-px-aligned left edges) of `colour` in the PNG."""
        png = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert png.shape == (140, 360, 3)  # 3 panels of 1.2 x 1.4 inches at 100 dpi
        ys, xs = np.nonzero((png == colour).all(-1))
        return len(xs), sorted({int(x) for x in xs if x - 1 not in set(xs.tolist())})

    red_green_blue = np.broadcast_to(np.eye(3)[:, None, None, :], (3, 8, 8, 3))
    save_png_grid(red_green_blue, tmp_path / "rgb.png")
    lefts = [squares(tmp_path / "rgb.png", tuple(255 * np.eye(3, dtype=int)[c])) for c in range(3)]
    assert [n for n, _ in lefts] == [100 * 100] * 3
    assert [x for _, x in lefts] == [[15], [130], [245]]  # red, green, blue from the left

    grey = np.stack([np.zeros((8, 8, 1)), np.full((8, 8, 1), 0.5), np.full((8, 8, 1), -3.0)])
    grey[0, :4] = 1.0  # top half white: only the bottom half of the first square is black
    save_png_grid(grey, tmp_path / "g.png")
    assert squares(tmp_path / "g.png", (128, 128, 128)) == (100 * 100, [130])
    assert squares(tmp_path / "g.png", (0, 0, 0)) == (100 * 50 + 100 * 100, [15, 245])
    save_png_grid(grey, tmp_path / "titled.png", titles=["a", "b", "c"])
    assert Image.open(tmp_path / "titled.png").size == (360, 140)


@pytest.mark.parametrize("streaming", [False, True])
def test_truncated_file_is_named(tmp_path: Path, tok: MultimodalTokenizer, streaming: bool) -> None:
    path = write_dataset(tmp_path, random_rows(50))
    data_file = path / "train.jsonl"
    lines = data_file.read_text().splitlines()
    data_file.write_text("\n".join(lines[:40] + [lines[40][:25]]) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(data_file))}: unreadable data file"):
        list(MultimodalDataset(str(path), "train", tok, seq_len=8, streaming=streaming))


def _write_rows(root: Path, rows: list[dict], name: str) -> Path:
    """A MoT dataset directory whose train split is `name`: a JSON array, or parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_dataset(root, []).joinpath("train.jsonl").unlink()
    if name.endswith(".json"):
        (root / name).write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), root / name)
    return root


@pytest.mark.parametrize("streaming, name", [
    (False, "train.json"), (False, "train.parquet"), (True, "train.parquet"), (False, "hub"), (True, "hub"),
])
def test_json_parquet_and_hub_datasets_read_like_jsonl(
    tmp_path: Path, tok: MultimodalTokenizer, streaming: bool, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of `train.jsonl` as `train.json` (a JSON array), `train.parquet` or a hub
    dataset give exactly its windows. The hub name is answered from a local parquet file (no
    internet): what is tested is the loader's handling of `load_dataset(name)`."""
    from torchtitan_mot.data import dataset as dataset_module

    rows = random_rows(30)

    def windows(path: str) -> list[int]:
        return stream_of(list(MultimodalDataset(path, "train", tok, seq_len=16, streaming=streaming)))

    expected = windows(str(write_dataset(tmp_path / "jsonl", rows)))
    if name != "hub":
        assert windows(str(_write_rows(tmp_path / "other", rows, name))) == expected
        return
    parquet = _write_rows(tmp_path / "other", rows, "train.parquet") / "train.parquet"
    local = dataset_module.load_dataset

    def hub(path: str, split: str, streaming: bool):
        assert path == "mot-org/demo"
        return local("parquet", data_files={split: str(parquet)}, split=split, streaming=streaming)

    monkeypatch.setattr(dataset_module, "load_dataset", hub)
    assert windows("mot-org/demo") == expected
    assert MultimodalDataset("mot-org/demo", "train", tok, seq_len=16).source == "mot-org/demo[train]"


def test_streaming_a_json_array_is_refused_by_name(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    """datasets streams a JSON array's mixed-field segments as undecoded strings, so
    `mot.streaming` with a .json split stops at start-up naming the file and the setting."""
    root = _write_rows(tmp_path / "ds", random_rows(3), "train.json")
    with pytest.raises(ValueError, match=r"train\.json: mot\.streaming cannot read a \.json file"):
        MultimodalDataset(str(root), "train", tok, seq_len=16, streaming=True)

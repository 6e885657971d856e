"""`torchtitan_mot.data.prepare`: shards, meta.json, tokenizers, bad input, atomic output."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_audio_folder, make_image_folder, make_text_docs
from torchtitan_mot.data.prepare import BadInput, PrepareConfig, load_tokenizer, prepare, shard_count
from torchtitan_mot.data.prepare.__main__ import parse_args

ROOT = Path(__file__).resolve().parents[2]


def small(tmp_path: Path, out: str = "ds", **kw) -> PrepareConfig:
    images, captions = make_image_folder(tmp_path / "raw", 24)
    defaults = dict(images=images, captions=captions, image_size=16, patch_size=4, image_codebook_size=32,
                    shard_rows=8, row_group_rows=3, validation_fraction=0.25, progress=False)
    return PrepareConfig(out=tmp_path / out, **{**defaults, **kw})


def read_rows(root: Path, split: str) -> list[dict]:
    meta = json.loads((root / "meta.json").read_text())
    return [r for f in meta["files"][split] for r in pq.read_table(root / f).to_pylist()]


def test_images_captions_docs(tmp_path: Path) -> None:
    docs = make_text_docs(tmp_path / "docs.jsonl", 8)
    out = prepare(small(tmp_path, text_docs=docs, text_tokenizer=ROOT / "assets" / "tokenizer"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["modalities"] == ["text", "image"] and meta["codebook_sizes"] == {"image": 32}
    assert meta["splits"] == {"validation": 8, "train": 24}
    assert len(meta["files"]["train"]) == shard_count(24, 8) == 4
    field = pq.read_schema(out / meta["files"]["train"][0]).field("segments").type
    assert field.value_type.field("tokens").type == pa.list_(pa.int32())  # ids, not JSON text
    # 8 validation rows: row groups of 1 row, so 8 streaming ranks can share them.
    assert pq.ParquetFile(out / meta["files"]["validation"][0]).metadata.num_row_groups == 8
    rows = read_rows(out, "train") + read_rows(out, "validation")
    kinds = [tuple(s["modality"] for s in r["segments"]) for r in rows]
    assert kinds.count(("text",)) == 8
    assert {("text", "image"), ("image", "text")} <= set(kinds)  # --order random: both orders
    image_ids = [s["tokens"] for r in rows for s in r["segments"] if s["modality"] == "image"]
    assert len(image_ids) == 24 and all(len(t) == 16 and 0 <= min(t) and max(t) < 32 for t in image_ids)
    assert meta["tokens"]["train"]["image"] + meta["tokens"]["validation"]["image"] == 24 * 16
    assert meta["text_tokenizer"]["vocab_size"] == 1024 and meta["tokens"]["train"]["text"] > 0
    assert not list(tmp_path.glob(".ds.*"))  # no temporary directory left behind

    # The saved tokenizer is found through the dataset alone and inverts its own ids.
    tok = load_tokenizer(out, "image")
    pixels = tok.decode(np.array(image_ids[0]))
    assert pixels.shape == (16, 16, 3)
    from PIL import Image

    again = tok.encode([Image.fromarray(np.round(pixels * 255).astype(np.uint8), "RGB")])[0]
    assert (again == np.array(image_ids[0])).mean() > 0.9  # only uint8 rounding may move an id

    # Same inputs and seed: same dataset; another seed: another split.
    assert read_rows(prepare(small(tmp_path, "again", text_docs=docs)), "train") == read_rows(out, "train")
    other = read_rows(prepare(small(tmp_path, "seed1", text_docs=docs, seed=1)), "validation")
    assert other != read_rows(out, "validation")


def test_cli_defaults_and_force(tmp_path: Path) -> None:
    images, captions = make_image_folder(tmp_path / "raw", 8)
    cfg = parse_args(["--images", str(images), "--captions", str(captions), "--out", str(tmp_path / "d"),
                      "--image-codebook-size", "64", "--no-progress"])
    assert (cfg.image_size, cfg.patch_size, cfg.image_mode, cfg.order) == (64, 4, "RGB", "random")
    prepare(cfg)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizers"]["image"]["tokens_per_item"] == 256
    with pytest.raises(FileExistsError, match="already holds a MoT dataset; pass --force"):
        prepare(cfg)
    cfg.force, cfg.image_codebook_size = True, 32
    prepare(cfg)
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["codebook_sizes"] == {"image": 32}


def test_interrupted_run_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchtitan_mot.data.prepare.build as build

    def interrupted(*args, **kwargs):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "encode_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(small(tmp_path))
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def _corrupt(case: str, images: Path, captions: Path) -> tuple[int, str]:
    """Break line 3 of the captions (or its image) in one way; returns (line, expected text)."""
    lines = captions.read_text().splitlines()
    record = json.loads(lines[2])
    path = images / record["file"]
    if case == "missing":
        path.unlink()
        expected = "does not exist"
    elif case == "empty_caption":
        record["text"] = "  "
        expected = "empty text"
    elif case == "zero_size":
        path.write_bytes(b"")
        expected = "is empty (0 bytes)"
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:60])
        expected = "unreadable image"
    else:  # too small
        from PIL import Image

        Image.new("RGB", (3, 40)).save(path)
        expected = "smaller than the patch size 4"
    lines[2] = json.dumps(record)
    captions.write_text("\n".join(lines) + "\n")
    return 3, expected


@pytest.mark.parametrize("case", ["missing", "empty_caption", "zero_size", "truncated", "too_small"])
def test_bad_input_named_or_skipped(tmp_path: Path, case: str) -> None:
    cfg = small(tmp_path)
    line, expected = _corrupt(case, cfg.images, cfg.captions)
    with pytest.raises(BadInput, match=rf"captions.jsonl:{line}\b.*{re.escape(expected)}"):
        prepare(cfg)
    assert not cfg.out.exists()
    cfg.skip_bad = True
    meta = json.loads((prepare(cfg) / "meta.json").read_text())
    assert meta["skipped"]["count"] == 1 and f"captions.jsonl:{line}" in meta["skipped"]["first"][0]
    assert sum(meta["splits"].values()) == 23


def test_csv_captions_and_text_ratio(tmp_path: Path) -> None:
    cfg = small(tmp_path, text_docs=make_text_docs(tmp_path / "docs.jsonl", 30), text_docs_ratio=0.2,
                order="text-first")
    records = [json.loads(line) for line in cfg.captions.read_text().splitlines()]
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("file,text\n" + "".join(f'{r["file"]},"{r["text"]}"\n' for r in records))
    cfg.captions = csv_path
    out = prepare(cfg)
    rows = read_rows(out, "train") + read_rows(out, "validation")
    assert sum(len(r["segments"]) == 1 for r in rows) == 6  # 0.2 of 30 rows
    assert all(r["segments"][0]["modality"] == "text" for r in rows)
    with pytest.raises(ValueError, match="--text-docs-ratio 0.9 needs 216 documents"):
        prepare(small(tmp_path, "x", text_docs=cfg.text_docs, text_docs_ratio=0.9))


def test_audio(tmp_path: Path) -> None:
    audio, transcripts = make_audio_folder(tmp_path / "raw", 12)
    out = prepare(PrepareConfig(out=tmp_path / "ds", audio=audio, transcripts=transcripts, audio_codebook_size=16,
                                sample_rate=8000, n_fft=256, hop_length=128, validation_fraction=0.25,
                                progress=False))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["modalities"] == ["text", "speech"] and meta["codebook_sizes"] == {"speech": 16}
    speech = [s["tokens"] for r in read_rows(out, "train") for s in r["segments"] if s["modality"] == "speech"]
    assert len(speech) == 9
    # One id per hop: 0.2-0.6 s at 8 kHz with hop 128 is 11-36 frames.
    assert all(11 <= len(t) <= 37 and max(t) < 16 for t in speech)
    tok = load_tokenizer(out, "speech")
    assert tok.decode(np.array(speech[0])).shape == (len(speech[0]), 40)

    (audio / "0.wav").write_bytes(b"RIFF0000garbage")
    with pytest.raises(BadInput, match=r"transcripts.jsonl:1\b.*unreadable audio"):
        prepare(PrepareConfig(out=tmp_path / "bad", audio=audio, transcripts=transcripts, audio_codebook_size=16,
                              progress=False))


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    """docs/data.md: `--num-workers 2` output is byte-identical to the 1-process run, and a
    rerun with the same inputs and seed writes the same bytes (two spawned workers: slow)."""
    docs = make_text_docs(tmp_path / "docs.jsonl", 8)
    tokenizer = ROOT / "assets" / "tokenizer"
    outs = [prepare(small(tmp_path, name, text_docs=docs, text_tokenizer=tokenizer, num_workers=workers,
                          chunk_size=4))  # 8 chunks of 4 items: both workers get several
            for name, workers in (("one", 0), ("again", 0), ("two", 2))]

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    reference = files(outs[0])
    assert len(reference) > 5 and "meta.json" in reference
    for out in outs[1:]:
        got = files(out)
        assert got.keys() == reference.keys(), out
        assert [k for k in reference if got[k] != reference[k]] == [], out


@pytest.mark.slow
def test_demo_data_script_writes_the_same_bytes_twice(tmp_path: Path) -> None:
    """docs/data.md: `scripts/make_demo_data.py` (tokenizer + text_image; speech needs
    espeak-ng) rewrites its output with identical bytes."""
    import subprocess
    import sys

    def build(out: Path) -> dict[str, bytes]:
        subprocess.run([sys.executable, "scripts/make_demo_data.py", "--out", str(out), "--skip-speech"],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert any(k.startswith("demo/text_image/") for k in first) and any(k.startswith("tokenizer/") for k in first)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []

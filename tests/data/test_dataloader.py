"""Dataloader builders: job-config wiring, checkpoint resume, dp-rank splitting, demo data."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import assert_same_batches, encoded_rows, REPO, rows_seen, TOKENIZER
from torchtitan.config import ConfigManager, JobConfig

from torchtitan_mot.data.dataloader import build_mot_dataloader, build_mot_validation_dataloader
from torchtitan_mot.data.tokenizer import build_mot_tokenizer

DEMO = REPO / "assets" / "demo"


def make_config(dataset: Path | str | None, *extra: str, modalities: str = "text,image", sizes=("256",)) -> JobConfig:
    args = [
        "--job.custom_config_module", "torchtitan_mot.config",
        "--model.hf_assets_path", TOKENIZER,
        "--mot.modalities", modalities,
        "--mot.codebook_sizes", *sizes,
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--validation.seq_len", "32",
        "--validation.local_batch_size", "2",
        *extra,
    ]
    if dataset is not None:
        args += ["--training.dataset_path", str(dataset), "--validation.dataset_path", str(dataset)]
    return ConfigManager().parse_args(args)


def write_rows(root: Path, n: int) -> Path:
    """n rows, each tagged "row i" so a rank's samples can be read back from its tokens."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"modalities": ["text", "image"], "codebook_sizes": {"image": 256}}))
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            segs = [
                {"modality": "text", "text": f"row {i}"},
                {"modality": "image", "tokens": [rng.randrange(256) for _ in range(rng.randint(1, 30))]},
            ]
            f.write(json.dumps({"segments": segs[:: rng.choice([1, -1])]}) + "\n")
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_across_epochs(tmp_path: Path, streaming: bool) -> None:
    cfg = make_config(write_rows(tmp_path, 24), *(["--mot.streaming"] if streaming else []))
    tok = build_mot_tokenizer(cfg)
    ref = list(itertools.islice(build_mot_dataloader(1, 0, tok, cfg), 40))  # ~3 epochs
    dl = build_mot_dataloader(1, 0, tok, cfg)
    it = iter(dl)
    head = [next(it) for _ in range(17)]  # mid second epoch
    state = dl.state_dict()
    fresh = build_mot_dataloader(1, 0, tok, cfg)
    fresh.load_state_dict(state)
    assert_same_batches(head + list(itertools.islice(fresh, 23)), ref)


@pytest.mark.parametrize("streaming", [False, True])
def test_dp_ranks_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    """The two ranks read every row once between them; the windows hold only their own rows."""
    cfg = make_config(write_rows(tmp_path, 40), *(["--mot.streaming"] if streaming else []))
    tok = build_mot_tokenizer(cfg)
    read = encoded_rows(monkeypatch, tmp_path / "rows")
    seen, rows = [], []
    for r in range(2):
        seen.append(set(rows_seen(tok, list(build_mot_dataloader(2, r, tok, cfg, infinite=False)))))
        rows.append(read())
        assert max(rows[r].values()) == 1 and seen[r] <= set(rows[r]), (r, rows[r], seen[r])
    assert not set(rows[0]) & set(rows[1])
    assert sorted(set(rows[0]) | set(rows[1])) == list(range(40))


def test_workers_split_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(write_rows(tmp_path, 40), "--training.dataloader.num_workers", "2")
    tok = build_mot_tokenizer(cfg)
    read = encoded_rows(monkeypatch, tmp_path / "rows")
    all_batches = list(build_mot_dataloader(1, 0, tok, cfg, infinite=False))
    rows = read()  # the workers hold disjoint halves: each row read once
    assert sorted(rows) == list(range(40)) and set(rows.values()) == {1}, rows
    seen = rows_seen(tok, all_batches)
    assert len(seen) == len(set(seen))
    dl = build_mot_dataloader(1, 0, tok, cfg, infinite=False)
    it = iter(dl)
    head = [next(it) for _ in range(5)]
    fresh = build_mot_dataloader(1, 0, tok, cfg, infinite=False)
    fresh.load_state_dict(dl.state_dict())
    assert_same_batches(head + list(fresh), all_batches)


@pytest.mark.parametrize(
    "variant, modalities, sizes",
    [("text_image", "text,image", ("256",)), ("text_image_speech", "text,image,speech", ("256", "256"))],
)
def test_demo_data(variant: str, modalities: str, sizes: tuple[str, ...]) -> None:
    cfg = make_config(DEMO / variant, modalities=modalities, sizes=sizes)
    tok = build_mot_tokenizer(cfg)
    n = len(cfg.mot.modalities)
    for dl in (build_mot_dataloader(1, 0, tok, cfg), build_mot_validation_dataloader(1, 0, tok, cfg)):
        x, y = next(iter(dl))
        assert x["input"].shape == x["modality_ids"].shape == y.shape == (2, 32)
        assert x["input"].dtype == x["modality_ids"].dtype == y.dtype == torch.long
        assert int(x["input"].max()) < tok.get_vocab_size() and int(x["modality_ids"].max()) < n
    val = list(build_mot_validation_dataloader(1, 0, tok, cfg))
    assert 0 < len(val) < len(list(itertools.islice(build_mot_dataloader(1, 0, tok, cfg, infinite=False), 10_000)))


def test_config_errors(tmp_path: Path) -> None:
    cfg = make_config(None)
    with pytest.raises(ValueError, match=r"\[training\].dataset_path"):
        build_mot_dataloader(1, 0, build_mot_tokenizer(cfg), cfg)
    three = make_config(DEMO / "text_image_speech", modalities="text,image,speech", sizes=("256", "256"))
    with pytest.raises(ValueError, match=r"tokenizer layout .* differs from \[mot\]"):
        build_mot_dataloader(1, 0, build_mot_tokenizer(three), make_config(DEMO / "text_image"))
    with pytest.raises(ValueError, match=r"text_image/meta.json declares modalities .* \[mot\].modalities"):
        build_mot_dataloader(1, 0, build_mot_tokenizer(three), make_config(
            DEMO / "text_image", modalities="text,image,speech", sizes=("256", "256")))

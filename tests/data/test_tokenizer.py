"""Unified vocabulary layout and MultimodalTokenizer round trips."""

import random
from pathlib import Path

import pytest
import torch
from torchtitan.config import ConfigManager

from torchtitan_mot.data.tokenizer import build_mot_tokenizer, MultimodalTokenizer, VocabLayout

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "assets" / "tokenizer")
MODALITIES = ("text", "image", "speech")


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    return MultimodalTokenizer(TOKENIZER, MODALITIES, (256, 100))


def test_layout_ranges() -> None:
    layout = VocabLayout(1000, MODALITIES, (256, 100))
    assert layout.vocab_size == 1000 + 258 + 102
    assert (layout.begin_id("image"), layout.end_id("image")) == (1000, 1001)
    assert layout.codebook_range("image") == (1002, 1258)
    assert (layout.begin_id("speech"), layout.end_id("speech")) == (1258, 1259)
    assert layout.codebook_range("speech") == (1260, 1360)
    assert layout.codebook_range("text") == (0, 1000)
    assert [layout.modality_index(m) for m in MODALITIES] == [0, 1, 2]


def test_token_modality_table_agrees_with_ranges() -> None:
    layout = VocabLayout(1000, MODALITIES, (256, 100))
    table = layout.token_modality_table()
    assert table.dtype == torch.long and len(table) == layout.vocab_size
    for name in MODALITIES:
        lo, hi = layout.codebook_range(name)
        assert (table[lo:hi] == layout.modality_index(name)).all()
        if name != "text":
            assert table[layout.begin_id(name)] == table[layout.end_id(name)] == layout.modality_index(name)


@pytest.mark.parametrize(
    "args, match",
    [
        ((100, ("image", "text"), (4,)), "must start with 'text'"),
        ((100, ("text", "image", "image"), (4, 4)), "duplicate"),
        ((100, ("text", "image"), (4, 4)), "one codebook size per non-text modality"),
        ((100, ("text", "image"), (-1,)), "codebook sizes must be"),
        ((0, ("text", "image"), (4,)), "text_vocab_size must be positive"),
    ],
)
def test_layout_validation(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VocabLayout(*args)


def test_layout_unknown_modality() -> None:
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        VocabLayout(10, ("text", "image"), (4,)).begin_id("video")


def test_special_tokens(tok: MultimodalTokenizer) -> None:
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.layout.text_vocab_size == 1024
    assert tok.get_vocab_size() == 1024 + 258 + 102
    ids = tok.encode("a handwritten digit", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == "a handwritten digit"


def test_round_trip(tok: MultimodalTokenizer) -> None:
    rng = random.Random(0)
    layout = tok.layout
    for _ in range(50):
        segments = []
        for _ in range(rng.randint(1, 5)):
            m = rng.choice(MODALITIES)
            if m == "text":
                text = " ".join(rng.choice(["a", "digit", "seven", "zebra", "é", "42,"]) for _ in range(rng.randint(1, 6)))
                segments.append({"modality": m, "text": text})
            else:
                size = layout.codebook_size(m)
                segments.append({"modality": m, "tokens": [rng.randrange(size) for _ in range(rng.randint(1, 20))]})
        # Adjacent text segments would merge on decode; keep them separated like real samples.
        segments = [s for i, s in enumerate(segments) if not (i and s["modality"] == segments[i - 1]["modality"] == "text")]
        ids: list[int] = []
        for seg in segments:
            enc = tok.encode_segment(seg["modality"], **{k: v for k, v in seg.items() if k != "modality"})
            name = seg["modality"]
            if name == "text":
                assert all(0 <= t < layout.text_vocab_size and t not in (tok.bos_id, tok.eos_id) for t in enc)
            else:
                lo, hi = layout.codebook_range(name)
                assert enc[0] == layout.begin_id(name) and enc[-1] == layout.end_id(name)
                assert all(lo <= t < hi for t in enc[1:-1])
            ids += enc
        assert tok.decode_segments([tok.bos_id] + ids + [tok.eos_id]) == segments


def test_decode_tolerates_truncated_generation(tok: MultimodalTokenizer) -> None:
    ids = tok.encode_segment("text", text="seven") + tok.encode_segment("image", tokens=[1, 2, 3])[:-2]
    assert tok.decode_segments(ids) == [{"modality": "text", "text": "seven"}, {"modality": "image", "tokens": [1, 2]}]


@pytest.mark.parametrize("bad", [256, -1, 3.0, "7"])
def test_encode_segment_range_check(tok: MultimodalTokenizer, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"tokens\[1\]={bad!r}.*'image' codebook \[0, 256\)"):
        tok.encode_segment("image", tokens=[0, bad])


def test_encode_segment_argument_errors(tok: MultimodalTokenizer) -> None:
    with pytest.raises(ValueError, match="needs `text`"):
        tok.encode_segment("text", tokens=[1])
    with pytest.raises(ValueError, match="needs `tokens`"):
        tok.encode_segment("image", text="x")
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        tok.encode_segment("video", tokens=[1])


def test_build_from_job_config() -> None:
    cfg = ConfigManager().parse_args(
        [
            "--job.custom_config_module", "torchtitan_mot.config",
            "--model.hf_assets_path", TOKENIZER,
            "--mot.modalities", "text,image,speech",
            "--mot.codebook_sizes", "256", "100",
        ]
    )
    tok = build_mot_tokenizer(cfg)
    assert tok.layout == VocabLayout(1024, MODALITIES, (256, 100))

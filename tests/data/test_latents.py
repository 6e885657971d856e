"""The Transfusion data path: latent encoders in `prepare`, latent meta.json, the latent
windows of `MultimodalDataset` against a naive reference, noise parity and resume, bad input."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX

from helpers import make_image_folder
from torchtitan_mot.config import LATENTS_ATTRIBUTE, ConfigError, load_job_config
from torchtitan_mot.data.dataset import BadSampleError, MultimodalDataset
from torchtitan_mot.data.latents import DiffusionWindows
from torchtitan_mot.data.meta import meta_modalities
from torchtitan_mot.data.prepare import PrepareConfig, latent_array, load_latent_encoder, prepare
from torchtitan_mot.data.prepare.__main__ import parse_args
from torchtitan_mot.data.tokenizer import MultimodalTokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "assets" / "tokenizer")
DEMO = ROOT / "assets" / "demo" / "text_image_latent"
SHAPE = (2, 4, 6)  # C, H, W: 2x3 patches of 2x2, P = 8
T = 1000


def read_rows(root: Path, split: str) -> list[dict]:
    meta = json.loads((root / "meta.json").read_text())
    return [r for f in meta["files"][split] for r in pq.read_table(root / f).to_pylist()]


def latents_of(root: Path, split: str) -> list[np.ndarray]:
    meta = json.loads((root / "meta.json").read_text())["latents"]["image"]
    return [latent_array(s["latent"], tuple(s["latent_shape"]), meta["dtype"])
            for r in read_rows(root, split) for s in r["segments"] if s["modality"] == "image"]


def fit_naive(path: Path, size: int, mode: str) -> np.ndarray:
    """(C, size, size) in [-1, 1]: the image resized and centre-cropped, written here."""
    from PIL import Image, ImageOps

    image = ImageOps.fit(Image.open(path).convert(mode), (size, size))
    array = np.asarray(image, dtype=np.float64).reshape(size, size, -1)
    return (array / 127.5 - 1).transpose(2, 0, 1)


def caption_files(captions: Path) -> dict[str, str]:
    return {json.loads(line)["text"]: json.loads(line)["file"] for line in captions.read_text().splitlines()}


@pytest.mark.parametrize("dtype, atol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_prepare_pixels(tmp_path: Path, dtype: str, atol: float) -> None:
    images, captions = make_image_folder(tmp_path / "raw", 12)
    argv = ["--out", str(tmp_path / "ds"), "--images", str(images), "--captions", str(captions), "--image-encoder",
            "pixels", "--image-size", "8", "--latent-dtype", dtype, "--validation-fraction", "0.25", "--no-progress"]
    out = prepare(parse_args(argv))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["codebook_sizes"] == {} and meta["tokenizers"] == {}
    assert meta["latents"]["image"] == {"shape": [3, 8, 8], "dtype": dtype,
                                        "encoder": {"kind": "pixels", "image_size": 8, "mode": "RGB"}}
    assert meta_modalities(out / "meta.json") == (["text", "image"], [0])
    files = caption_files(captions)
    rows = read_rows(out, "train") + read_rows(out, "validation")
    assert len(rows) == 12
    for row in rows:
        text = next(s["text"] for s in row["segments"] if s["modality"] == "text")
        seg = next(s for s in row["segments"] if s["modality"] == "image")
        stored = latent_array(seg["latent"], tuple(seg["latent_shape"]), dtype)
        np.testing.assert_allclose(stored, fit_naive(images / files[text], 8, "RGB"), atol=atol)
    # the encoder decodes its latents back to pixels in [0, 1]
    pixels = load_latent_encoder(out, "image").decode(stored)
    assert pixels.shape == (8, 8, 3) and 0 <= pixels.min() and pixels.max() <= 1


def test_prepare_vae_matches_the_vaes_own_encode(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    images, captions = make_image_folder(tmp_path / "raw", 6)
    out = prepare(PrepareConfig(out=tmp_path / "ds", images=images, captions=captions, image_encoder="vae",
                                vae_dir=tmp_path / "vae", image_size=16, validation_fraction=0, progress=False))
    meta = json.loads((out / "meta.json").read_text())["latents"]["image"]
    assert meta["shape"] == [4, 8, 8] and meta["encoder"]["kind"] == "vae"
    assert meta["encoder"]["scaling_factor"] == 0.5
    files = caption_files(captions)
    for row in read_rows(out, "train"):
        text = next(s["text"] for s in row["segments"] if s["modality"] == "text")
        seg = next(s for s in row["segments"] if s["modality"] == "image")
        stored = latent_array(seg["latent"], tuple(seg["latent_shape"]), "float16")
        x = torch.tensor(fit_naive(images / files[text], 16, "RGB"), dtype=torch.float32)[None]
        with torch.no_grad():
            expected = (vae.encode(x).latent_dist.mean * 0.5)[0].numpy()
        np.testing.assert_allclose(stored, expected, atol=2e-3, rtol=2e-3)


def test_prepare_refuses_mixed_image_settings(tmp_path: Path) -> None:
    images, captions = make_image_folder(tmp_path / "raw", 2)
    with pytest.raises(ValueError, match="--image-encoder vae and --vae-dir"):
        prepare(PrepareConfig(out=tmp_path / "a", images=images, captions=captions, image_encoder="vae"))
    with pytest.raises(ValueError, match="--image-encoder .* --image-tokenizer"):
        prepare(PrepareConfig(out=tmp_path / "b", images=images, captions=captions, image_encoder="pixels",
                              image_tokenizer="chameleon", chameleon_dir=tmp_path))


# --- windows ---------------------------------------------------------------------------------


def latent_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of text and random latents (every patch distinct), in varied layouts."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        text = {"modality": "text", "text": f"row {i} " + "a digit " * int(rng.integers(0, 4))}
        images = [{"modality": "image", "latent": rng.standard_normal(SHAPE).round(2).tolist()}
                  for _ in range(int(rng.integers(1, 3)))]
        layout = [text, *images] if i % 3 else [*images, text, dict(text, text="more")]
        rows.append({"segments": layout})
    return rows


def write_latent_dataset(root: Path, rows: list[Any], split: str = "train", shape: list[int] | None = None,
                         codebook: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"modalities": ["text", "image"], "codebook_sizes": {"image": 16} if codebook else {},
                            "latents": {"image": {"shape": shape or list(SHAPE), "dtype": "float16",
                                                  "encoder": {"kind": "test"}}}}
    (root / "meta.json").write_text(json.dumps(meta))
    with open(root / f"{split}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    return MultimodalTokenizer(TOKENIZER, ["text", "image"], [0])


def windows_of(root: Path, tok: MultimodalTokenizer, seq_len: int, split: str = "train", n: int | None = None,
               rank: int = 0, world: int = 1, **kw: Any) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    diffusion = DiffusionWindows(("image",), T, 2, seed=3, stratified=split == "validation", **kw)
    ds = MultimodalDataset(str(root), split, tok, seq_len, dp_rank=rank, dp_world_size=world, diffusion=diffusion)
    out = []
    for window in ds:
        out.append(window)
        if n is not None and len(out) == n:
            break
    return out


def naive_stream(rows: list[dict], tok: MultimodalTokenizer) -> tuple[list[int], list[Any], list[Any]]:
    """Ids, and per position the clean patch and (row, image) key, written out here."""
    boi, eoi = tok.layout.begin_id("image"), tok.layout.end_id("image")
    ids, patches, keys = [], [], []
    for r, row in enumerate(rows):
        ids.append(tok.bos_id), patches.append(None), keys.append(None)
        k = 0
        for seg in row["segments"]:
            if seg["modality"] == "text":
                t = tok.encode_segment("text", text=seg["text"])
                ids += t
                patches += [None] * len(t)
                keys += [None] * len(t)
                continue
            z = np.asarray(seg["latent"], np.float32).astype(np.float16).astype(np.float32)
            c, h, w = z.shape
            ids.append(boi), patches.append(None), keys.append(None)
            for gy in range(h // 2):
                for gx in range(w // 2):
                    vec = [z[ci, gy * 2 + py, gx * 2 + px] for ci in range(c) for py in range(2) for px in range(2)]
                    ids.append(boi), patches.append(vec), keys.append((r, k, gy * (w // 2) + gx))
            ids.append(eoi), patches.append(None), keys.append(None)
            k += 1
        ids.append(tok.eos_id), patches.append(None), keys.append(None)
    return ids, patches, keys


def test_window_contents_match_a_naive_reference(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    rows = latent_rows(12)
    root = write_latent_dataset(tmp_path / "ds", rows)
    seq = 23  # cuts images at window edges
    windows = windows_of(root, tok, seq, caption_first_prob=1.0)  # rows keep their stored order
    ids, patches, keys = naive_stream(rows, tok)
    boi = tok.layout.begin_id("image")
    assert len(windows) == len(ids) // (seq + 1) >= 10
    draws = DiffusionWindows(("image",), T, 2, seed=3)
    image_first = {r: r % 3 == 0 for r in range(len(rows))}  # latent_rows: images before the text
    t_of: dict[Any, int] = {}
    cut = 0
    for w, (x, labels) in enumerate(windows):
        lo = w * (seq + 1)
        assert x["input"].tolist() == ids[lo : lo + seq]
        assert x["modality_ids"].tolist() == [int(i >= boi) for i in ids[lo : lo + seq]]
        expected = [IGNORE_INDEX if i == boi else nxt for i, nxt in zip(ids[lo : lo + seq], ids[lo + 1 : lo + seq + 1])]
        assert labels.tolist() == expected
        assert {k: v.dtype for k, v in x.items()} == {"input": torch.int64, "modality_ids": torch.int64,
                                                     "patches": torch.float32, "noise": torch.float32,
                                                     "timesteps": torch.int64, "image_ids": torch.int64}
        order: list[Any] = []
        for j in range(seq):
            key, vec = keys[lo + j], patches[lo + j]
            if key is not None:
                # the image's one (positions, P) draw, sliced at this patch whatever window it lands in
                t, eps = draws.draw(0, key[0], key[1], 6, 8, image_first[key[0]])
                assert x["noise"][j].tolist() == eps[key[2]].tolist() and x["timesteps"][j] == t
                key = key[:2]
            if key is None:
                assert x["image_ids"][j] == -1 and x["timesteps"][j] == 0
                assert not x["patches"][j].any() and not x["noise"][j].any()
                continue
            if key not in order:
                order.append(key)
            assert x["image_ids"][j] == order.index(key)
            assert x["patches"][j].tolist() == vec
            t_of.setdefault(key, int(x["timesteps"][j]))
            assert x["timesteps"][j] == t_of[key]
        cut += keys[lo] is not None and keys[lo - 2] is not None and keys[lo][:2] == keys[lo - 2][:2] if w else 0
    assert cut >= 1  # some image was split across a window edge
    assert len(set(t_of.values())) > 5  # t drawn per image
    assert all(0 <= t < T for t in t_of.values())


def test_caption_order_and_image_first_cap(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    rng = np.random.default_rng(1)
    rows = [{"segments": [{"modality": "text", "text": f"caption {i}"},
                          {"modality": "image", "latent": rng.standard_normal(SHAPE).tolist()}]} for i in range(80)]
    root = write_latent_dataset(tmp_path / "ds", rows)
    boi = tok.layout.begin_id("image")

    def firsts(prob: float, cap: int = 0) -> tuple[list[bool], set[int]]:
        x = windows_of(root, tok, 600, caption_first_prob=prob, image_first_max_t=cap)[0][0]
        starts = [j for j in range(1, len(x["input"])) if x["input"][j - 1] == tok.bos_id]
        ts = set(x["timesteps"][x["image_ids"] >= 0].tolist())
        return [int(x["input"][j]) != boi for j in starts], ts

    assert all(firsts(1.0)[0])
    order, ts = firsts(0.0, cap=10)
    assert not any(order) and max(ts) <= 10  # image before its caption: t capped
    mixed = firsts(0.5)[0]
    assert len(mixed) > 30 and 8 < sum(mixed) < len(mixed) - 8 and mixed == firsts(0.5)[0]  # per row, seeded


def noise_by_patch(windows: list) -> dict[bytes, tuple[bytes, int]]:
    """Clean patch -> (its noise, its t): every patch of the test rows is distinct."""
    out = {}
    for x, _ in windows:
        for j in torch.nonzero(x["image_ids"] >= 0).flatten().tolist():
            out[(x["patches"][j] + 0.0).numpy().tobytes()] = (x["noise"][j].numpy().tobytes(), int(x["timesteps"][j]))
    return out


def test_noise_is_the_same_on_any_dp_layout(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    root = write_latent_dataset(tmp_path / "ds", latent_rows(16))
    one = noise_by_patch(windows_of(root, tok, 20))
    two = {**noise_by_patch(windows_of(root, tok, 20, rank=0, world=2)),
           **noise_by_patch(windows_of(root, tok, 20, rank=1, world=2))}
    shared = one.keys() & two.keys()
    assert len(shared) > 0.8 * len(one)  # all but the positions lost at each layout's window edges
    assert all(one[k] == two[k] for k in shared)


def write_latent_shards(root: Path, rows: list[dict], shards: int = 3) -> Path:
    """The rows as prepare writes them: parquet shards of raw fp16 latent bytes."""
    import pyarrow as pa

    from torchtitan_mot.data.prepare.build import LATENT_SCHEMA
    from torchtitan_mot.data.prepare.latent import latent_bytes

    (root / "train").mkdir(parents=True)
    files = []
    for k in range(shards):
        part = []
        for row in rows[k::shards]:
            part.append({"segments": [
                {"modality": s["modality"], "text": s.get("text"), "tokens": None,
                 "latent": latent_bytes(np.asarray(s["latent"]), "float16") if "latent" in s else None,
                 "latent_shape": list(SHAPE) if "latent" in s else None} for s in row["segments"]]})
        files.append(f"train/part-{k}.parquet")
        pq.write_table(pa.Table.from_pylist(part, schema=LATENT_SCHEMA), root / files[-1], row_group_size=2)
    write_latent_dataset(root, [])
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "files": {"train": files}}))
    return root


def test_noise_is_the_same_on_any_dp_layout_streaming(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    root = write_latent_shards(tmp_path / "ds", latent_rows(18))
    diffusion = DiffusionWindows(("image",), T, 2, seed=3)

    def windows(rank: int, world: int) -> list:
        return list(MultimodalDataset(str(root), "train", tok, 20, dp_rank=rank, dp_world_size=world,
                                      streaming=True, diffusion=diffusion))

    one = noise_by_patch(windows(0, 1))
    two = {**noise_by_patch(windows(0, 2)), **noise_by_patch(windows(1, 2))}
    shared = one.keys() & two.keys()
    assert len(shared) > 0.8 * len(one) and all(one[k] == two[k] for k in shared)
    # parquet bytes and JSON lists of the same latents give the same windows
    jsonl = write_latent_dataset(tmp_path / "json", [r for k in range(3) for r in latent_rows(18)[k::3]])
    assert noise_by_patch(windows_of(jsonl, tok, 20)) == one  # same global rows, same noise


def test_dataloader_passes_the_latent_tensors() -> None:
    from torchtitan_mot.data import build_mot_dataloader, build_mot_tokenizer, build_mot_validation_dataloader

    cfg = load_job_config(demo_config("--mot.diffusion_modalities", "image", "--training.seq_len", "64",
                                      "--validation.seq_len", "64"))
    tok = build_mot_tokenizer(cfg)
    x, labels = next(iter(build_mot_dataloader(1, 0, tok, cfg)))
    bs = cfg.training.local_batch_size
    assert {k: (tuple(v.shape), v.dtype) for k, v in x.items()} == {
        "input": ((bs, 64), torch.int64), "modality_ids": ((bs, 64), torch.int64),
        "patches": ((bs, 64, 4), torch.float32), "noise": ((bs, 64, 4), torch.float32),
        "timesteps": ((bs, 64), torch.int64), "image_ids": ((bs, 64), torch.int64)}
    assert labels.shape == (bs, 64) and (labels == IGNORE_INDEX).any()
    v, _ = next(iter(build_mot_validation_dataloader(1, 0, tok, cfg)))
    strata = {math.floor((k + 0.5) / 8 * cfg.mot.diffusion_timesteps) for k in range(8)}
    assert set(v["timesteps"][v["image_ids"] >= 0].tolist()) <= strata


def test_resume_gives_the_same_windows(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    root = write_latent_dataset(tmp_path / "ds", latent_rows(6))
    diffusion = DiffusionWindows(("image",), T, 2, seed=3)

    def build() -> MultimodalDataset:
        return MultimodalDataset(str(root), "train", tok, 19, diffusion=diffusion, infinite=True)

    full, it = [], iter(build())
    full = [next(it) for _ in range(30)]  # past the end of the data: a second epoch
    first = build()
    it = iter(first)
    for _ in range(12):  # into the second epoch
        next(it)
    assert first.state_dict()["epoch"] == 1
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    rest = [next(it) for _ in range(18)]
    for (xa, ya), (xb, yb) in zip(full[12:], rest):
        assert torch.equal(ya, yb) and all(torch.equal(xa[k], xb[k]) for k in xa)
    # another epoch draws other noise for the same patches
    epoch0, epoch1 = noise_by_patch(full[:8]), noise_by_patch(full[20:])
    shared = epoch0.keys() & epoch1.keys()
    assert shared and all(epoch0[k][0] != epoch1[k][0] for k in shared)


def test_validation_uses_stratified_timesteps(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    rows = [{"segments": [{"modality": "text", "text": f"c {i}"},
                          {"modality": "image", "latent": np.full(SHAPE, i / 10).tolist()}]} for i in range(16)]
    root = write_latent_dataset(tmp_path / "ds", rows, split="validation")
    x = windows_of(root, tok, 150, split="validation")[0][0]
    n = int(x["image_ids"].max()) + 1
    ts = [int(x["timesteps"][x["image_ids"] == k][0]) for k in range(n)]  # image k is row k's
    assert n >= 9 and ts == [math.floor((k % 8 + 0.5) / 8 * T) for k in range(n)]
    again = windows_of(root, tok, 150, split="validation")[0][0]
    assert torch.equal(x["noise"], again["noise"])


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["shape", "nan", "tokens"])
def test_bad_latent_names_file_and_row(tmp_path: Path, tok: MultimodalTokenizer, case: str) -> None:
    rows = latent_rows(5)
    bad = np.zeros(SHAPE)
    if case == "nan":
        bad[0, 1, 2] = np.nan
    seg = {"modality": "image", "latent": np.zeros((2, 4, 4)).tolist() if case == "shape"
           else bad.tolist() if case == "nan" else None}
    if case == "tokens":
        seg["tokens"] = [1, 2]
    rows[3] = {"segments": [{"modality": "text", "text": "x"}, seg]}
    root = write_latent_dataset(tmp_path / "ds", rows)
    message = {"shape": r"latent shape \[2, 4, 4\] differs from meta.json's \[2, 4, 6\]", "nan": "NaN/inf",
               "tokens": "not 'tokens'"}[case]
    with pytest.raises(BadSampleError, match=rf"{root / 'train.jsonl'}: row 3: segments\[1\].*{message}"):
        windows_of(root, tok, 20)


def test_bad_stored_parquet_latent_shape(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    images, captions = make_image_folder(tmp_path / "raw", 4)
    out = prepare(PrepareConfig(out=tmp_path / "ds", images=images, captions=captions, image_encoder="pixels",
                                image_size=4, image_mode="L", validation_fraction=0, progress=False))
    meta = json.loads((out / "meta.json").read_text())
    meta["latents"]["image"]["shape"] = [1, 4, 2]  # the rows hold [1, 4, 4]
    (out / "meta.json").write_text(json.dumps(meta))
    shard = out / meta["files"]["train"][0]
    match = rf"row 0 \({shard} row 0\): segments\[\d\]\.latent: latent shape \[1, 4, 4\] differs"
    with pytest.raises(BadSampleError, match=match):
        windows_of(out, tok, 20)


def test_patch_size_not_dividing_the_latent_is_refused(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    root = write_latent_dataset(tmp_path / "ds", latent_rows(2), shape=[2, 4, 5])
    with pytest.raises(ConfigError, match="mot.diffusion_patch_size 2 does not cut"):
        windows_of(root, tok, 20)
    with pytest.raises(ConfigError, match=r"modalities stored as latents \['image'\] must be exactly"):
        MultimodalDataset(str(root), "train", tok, 20)


def demo_config(*extra: str) -> list[str]:
    return ["--job.config_file", "debug_mot.toml", "--training.dataset_path", str(DEMO),
            "--validation.dataset_path", str(DEMO), *extra]


def test_config_resolves_the_latent_demo() -> None:
    cfg = load_job_config(demo_config("--mot.diffusion_modalities", "image"))
    assert cfg.mot.modalities == ["text", "image"] and cfg.mot.codebook_sizes == [0]
    assert getattr(cfg.mot, LATENTS_ATTRIBUTE) == {"image": (1, 8, 8)}


@pytest.mark.parametrize("case", ["unlisted", "codebook", "patch"])
def test_config_refuses_mismatched_diffusion_settings(tmp_path: Path, case: str) -> None:
    if case == "unlisted":
        args, match = demo_config(), "stored as continuous latents .* --mot.diffusion_modalities"
    elif case == "patch":
        args, match = demo_config("--mot.diffusion_modalities", "image", "--mot.diffusion_patch_size", "3"), \
            "--mot.diffusion_patch_size 3 does not divide"
    else:
        args = ["--job.config_file", "debug_mot.toml", "--mot.diffusion_modalities", "image"]
        match = "--mot.diffusion_modalities names 'image', but it has a codebook of 256 ids"
    with pytest.raises(ConfigError, match=match):
        load_job_config(args)


def test_meta_with_both_codebook_and_latents_is_refused(tmp_path: Path, tok: MultimodalTokenizer) -> None:
    root = write_latent_dataset(tmp_path / "ds", latent_rows(2), codebook=True)
    with pytest.raises(ValueError, match="either a codebook or latents, 'image' has both"):
        meta_modalities(root / "meta.json")


def test_demo_latent_dataset(tok: MultimodalTokenizer) -> None:
    meta = json.loads((DEMO / "meta.json").read_text())
    assert meta["latents"]["image"]["shape"] == [1, 8, 8] and meta["splits"] == {"validation": 180, "train": 1617}
    digits = latents_of(DEMO, "validation")
    assert len(digits) == 180 and all(-1 <= d.min() and d.max() <= 1 for d in digits)
    x, labels = windows_of(DEMO, tok, 64, n=1)[0]
    assert (x["image_ids"] >= 0).sum() > 0 and (labels == IGNORE_INDEX).sum() > 0


def test_latent_modality_in_the_vocabulary_is_its_two_markers() -> None:
    from torchtitan_mot.data.tokenizer import VocabLayout

    layout = VocabLayout(100, ("text", "image", "speech"), (0, 8))
    assert layout.latent_modalities == ("image",)
    assert (layout.begin_id("image"), layout.end_id("image"), layout.codebook_range("image")) == (100, 101, (102, 102))
    assert layout.begin_id("speech") == 102 and layout.vocab_size == 100 + 2 + 10
    assert layout.token_modality_table()[98:104].tolist() == [0, 0, 1, 1, 2, 2]

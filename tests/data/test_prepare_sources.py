"""prepare from a local HuggingFace dataset, and with Chameleon's VQ-VAE (tiny random config,
offline) as the image tokenizer."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import make_image_folder
from torchtitan_mot.data.prepare import BadInput, PrepareConfig, load_tokenizer, prepare


def image_ids(out: Path) -> list[list[int]]:
    meta = json.loads((out / "meta.json").read_text())
    files = meta["files"]["train"] + meta["files"]["validation"]
    rows = [r for f in files for r in pq.read_table(out / f).to_pylist()]
    return [s["tokens"] for r in rows for s in r["segments"] if s["modality"] == "image"]


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    from datasets import Dataset, Image

    images, captions = make_image_folder(tmp_path / "raw", 12)
    records = [json.loads(line) for line in captions.read_text().splitlines()]
    pictures = [{"bytes": (images / r["file"]).read_bytes(), "path": None} for r in records]
    columns = {"picture": pictures, "caption": [r["text"] for r in records]}
    Dataset.from_dict(columns).cast_column("picture", Image()).save_to_disk(str(tmp_path / "hf"))
    cfg = dict(hf_dataset=str(tmp_path / "hf"), image_column="picture", text_column="caption", image_size=16,
               image_codebook_size=16, validation_fraction=0.25, progress=False)
    out = prepare(PrepareConfig(out=tmp_path / "ds", **cfg))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"validation": 3, "train": 9}
    assert len(image_ids(out)) == 12 and all(len(t) == 16 for t in image_ids(out))

    with pytest.raises(BadInput, match=r"no column 'text' \(--text-column\)"):
        prepare(PrepareConfig(out=tmp_path / "x", **{**cfg, "text_column": "text"}))
    pictures[4] = {"bytes": b"not an image", "path": None}
    Dataset.from_dict(columns).cast_column("picture", Image()).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(BadInput, match=r"broken\[train\] row 4: unreadable image"):
        prepare(PrepareConfig(out=tmp_path / "y", **{**cfg, "hf_dataset": str(tmp_path / "broken")}))


def test_chameleon_vqvae_adapter(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the [chameleon] extra is not installed")
    import torch
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=16,
                                  base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
    model = ChameleonVQVAE(config)
    model.save_pretrained(str(tmp_path / "vq"))
    images, captions = make_image_folder(tmp_path / "raw", 10)
    out = prepare(PrepareConfig(out=tmp_path / "ds", images=images, captions=captions, image_tokenizer="chameleon",
                                chameleon_dir=tmp_path / "vq", validation_fraction=0.2, progress=False))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["codebook_sizes"] == {"image": 32}
    assert meta["tokenizers"]["image"]["tokens_per_item"] == 64  # (16 px / 2)^2
    ids = image_ids(out)
    assert len(ids) == 10 and all(len(t) == 64 and max(t) < 32 for t in ids)

    tok = load_tokenizer(out, "image")
    from PIL import Image

    # Pixels by hand: a 16x24 RGB picture (portrait) and a 24x16 grey one (landscape) at the
    # VQ-VAE's 16 px resolution: centre crop, no resize, grey copied to R, G and B, / 127.5 - 1.
    rng = np.random.default_rng(0)
    rgb, grey = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8), rng.integers(0, 256, (16, 24), dtype=np.uint8)
    pictures = [Image.fromarray(rgb, "RGB"), Image.fromarray(grey, "L")]
    crops = np.stack([rgb[4:20], np.repeat(grey[:, 4:20, None], 3, axis=2)]).astype(np.float32)
    expected_pixels = torch.from_numpy(crops / 127.5 - 1.0).permute(0, 3, 1, 2)
    assert torch.equal(tok.pixel_values(pictures), expected_pixels)
    with torch.no_grad():
        expected = model.encode(expected_pixels).image_tokens.reshape(2, 64).numpy()
    encoded = tok.encode(pictures)
    assert all(np.array_equal(encoded[i], expected[i]) for i in range(2))
    assert len(set(expected[0].tolist())) > 1  # the random VQ-VAE gives more than one code
    latents = tok.decode(encoded[0])
    assert np.array_equal(latents, model.quantize.embedding.weight.detach().numpy()[encoded[0]].reshape(8, 8, 8))

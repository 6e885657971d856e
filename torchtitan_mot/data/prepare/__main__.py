"""Command line of `python -m torchtitan_mot.data.prepare` (every flag maps to a PrepareConfig field)."""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .build import IMAGE_ENCODERS, ORDERS, PrepareConfig, prepare
from .tokenizers import BadInput

HELP = {
    "out": "output dataset directory (written atomically)",
    "images": "folder of images (png/jpg/webp..., any size, grey or RGB)",
    "captions": 'jsonl {"file": <relative to --images>, "text": ...} per line, or csv with those columns',
    "hf_dataset": "HuggingFace dataset: local directory (save_to_disk, imagefolder, parquet) or hub name",
    "hf_split": "split of --hf-dataset to read",
    "image_column": "image column of --hf-dataset",
    "text_column": "caption column of --hf-dataset",
    "audio": "folder of audio files (wav/flac/ogg)",
    "transcripts": "jsonl/csv like --captions, for --audio",
    "text_docs": 'text-only documents: jsonl {"text": ...} or .txt (blank-line separated)',
    "text_docs_ratio": "fraction of rows that are text-only documents (default: all documents)",
    "order": "segment order in a sample: caption/transcript first, media first, or random (50/50, seeded)",
    "image_tokenizer": "patch_vq (fitted here) or chameleon (pretrained, needs --chameleon-dir and the [chameleon] extra)",
    "image_size": "patch_vq and latent encoders: images are resized and centre-cropped to this square side",
    "patch_size": "patch_vq: patch side; (image_size/patch_size)^2 tokens per image",
    "image_mode": "patch_vq and --image-encoder pixels: colour mode, L (grey) or RGB",
    "image_codebook_size": "patch_vq: k-means codebook size",
    "chameleon_dir": "local directory of a transformers ChameleonVQVAE (config.json + weights)",
    "image_encoder": "images as continuous latents for the Transfusion setting instead of ids: pixels "
    "(the resized image in [-1, 1], --image-size/--image-mode) or vae (needs --vae-dir)",
    "vae_dir": "local directory of a diffusers AutoencoderKL (config.json + weights), for --image-encoder vae",
    "latent_dtype": "storage dtype of latents: float16 or bfloat16",
    "sample_rate": "audio is resampled to this rate",
    "n_fft": "audio STFT size",
    "hop_length": "audio hop (one token per hop)",
    "n_mels": "mel bands",
    "audio_codebook_size": "audio k-means codebook size",
    "fit_items": "at most this many items (seeded sample) fit each codebook",
    "validation_fraction": "fraction of rows in the validation split (seeded)",
    "shard_rows": "target rows per parquet shard (the count is rounded to divide evenly)",
    "row_group_rows": "rows per parquet row group (the unit the streaming loader assigns to readers); "
    "smaller where a split would otherwise have fewer than 256 row groups",
    "text_tokenizer": "HF tokenizer directory the dataset is meant for; meta.json then counts text in its tokens",
    "seed": "seed for the split, the order and codebook fitting",
    "num_workers": "encoding processes (0: this process)",
    "chunk_size": "items per encoding task",
    "skip_bad": "skip unreadable/missing/empty inputs, counting them in meta.json, instead of stopping",
    "force": "replace an existing dataset at --out",
    "progress": "show progress bars",
}


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_mot.data.prepare", description=__doc__)
    for f in dataclasses.fields(PrepareConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
            continue
        kind = str(f.type)
        conv = Path if "Path" in kind else int if "int" in kind else float if "float" in kind else str
        kwargs = {"choices": ORDERS} if f.name == "order" else {"choices": IMAGE_ENCODERS} if f.name == "image_encoder" else {}
        default = None if f.default is dataclasses.MISSING else f.default
        parser.add_argument(flag, type=conv, default=default, required=f.name == "out", help=HELP[f.name], **kwargs)
    return PrepareConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    start = time.perf_counter()
    try:
        out = prepare(cfg)
    except (BadInput, FileExistsError, ValueError) as e:
        sys.exit(f"prepare: error: {e}")
    import json

    meta = json.loads((out / "meta.json").read_text())
    seconds = time.perf_counter() - start
    rows = sum(meta["splits"].values())
    print(f"wrote {out}: {meta['splits']} rows, modalities {meta['modalities']}, "
          f"codebooks {meta['codebook_sizes']}, "
          f"latents { {m: e['shape'] for m, e in meta.get('latents', {}).items()} }, skipped {meta['skipped']['count']}; "
          f"{seconds:.1f} s ({rows / seconds:.1f} rows/s)")
    print(text_tokenizer_note(meta.get("text_tokenizer")))


def text_tokenizer_note(recorded: dict | None) -> str:
    """Which tokenizer will encode the dataset's text: prepare stores raw text, the training
    run encodes it with its `--model.hf_assets_path`."""
    if recorded:
        return (f"text is stored raw and counted in the tokens of {recorded['path']} "
                f"({recorded['vocab_size']:,} ids): train with --model.hf_assets_path {recorded['path']}")
    return ("text is stored raw and encoded at training time by the config's --model.hf_assets_path; "
            "the debug configs use the bundled demo tokenizer (1,024 ids fitted to the demo captions): "
            "for your own text pass --model.hf_assets_path DIR (e.g. a Llama 3 tokenizer; "
            "--text-tokenizer DIR here records it in meta.json)")


if __name__ == "__main__":
    main()

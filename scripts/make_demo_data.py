"""Build the offline demo assets: a BPE text tokenizer and three datasets made by `prepare`.

This script only makes raw inputs, then hands them to `torchtitan_mot.data.prepare` (which fits
the image/audio codebooks, splits and writes meta.json + parquet shards + codebook files):

- images: scikit-learn's `load_digits()` (1797 handwritten 8x8 digits) as grey PNGs, with
  captions from templates;
- text_image_latent: the same digits and captions with each image as its own pixels, a
  (1, 8, 8) latent in [-1, 1] (`--image-encoder pixels`), for the Transfusion setting;
- speech (text_image_speech only): digit phrases spoken by `espeak-ng`
  (`apt-get install -y espeak-ng`), silence-trimmed, with their words as transcripts.

Deterministic for the seed: rerunning (same library versions) rewrites `assets/tokenizer/` and
`assets/demo/` with identical bytes. Contents and regeneration: docs/data.md ("The demo datasets").

    python scripts/make_demo_data.py [--out assets] [--skip-speech]
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np

from torchtitan_mot.data.prepare import PrepareConfig, load_tokenizer, prepare
from torchtitan_mot.generate import save_png_grid

SEED = 0
TEXT_VOCAB_SIZE = 1024
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    "a handwritten digit {w}",
    "the number {w}, written by hand",
    "an image of the digit {w}",
    "a small scanned picture of the digit {w}",
    "handwritten {d}",
    "this is the number {w}",
]
SPOKEN = ["{w}", "the digit {w}", "number {w}"]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland"]
SPEEDS = [120, 150, 180, 210]
# prepare's settings for both datasets: 8x8 grey digits -> 16 ids of 2x2 patches, 256 codes;
# 16 kHz audio, 40 mel bands, one id per 32 ms hop, 256 codes; 10% validation; 4 train shards.
COMMON = dict(
    image_size=8, patch_size=2, image_mode="L", image_codebook_size=256, order="random",
    validation_fraction=0.1, shard_rows=512, fit_items=4000, seed=SEED, force=True,
)
AUDIO = dict(sample_rate=16000, n_fft=1024, hop_length=512, n_mels=40, audio_codebook_size=256)


def generic_english() -> list[str]:
    """Offline English prose so the BPE learns more than the caption words."""
    import codecs
    import collections
    import functools
    import itertools
    import json as json_mod
    import pathlib
    import re
    import string
    from contextlib import redirect_stdout

    import sklearn.datasets

    with redirect_stdout(io.StringIO()):  # `this` prints the Zen of Python on import
        import this

    texts = [codecs.decode(this.s, "rot13")]
    descr = Path(sklearn.datasets.__file__).parent / "descr"
    texts += [p.read_text() for p in sorted(descr.glob("*.rst"))]
    for mod in (collections, functools, itertools, json_mod, pathlib, re, string, random):
        texts.append(mod.__doc__ or "")
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str) and not name.startswith("_"):
                texts.append(doc)
    return texts


def train_tokenizer(corpus: list[str], out: Path) -> None:
    """Byte-level BPE with bos/eos declared so torchtitan's HuggingFaceTokenizer finds them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_listing(path: Path, records: list[dict[str, str]]) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_digits(images: np.ndarray, captions: list[str], raw: Path) -> tuple[Path, Path]:
    """8x8 digits (pixels 0..16) as grey PNGs plus a captions listing."""
    from PIL import Image

    folder = raw / "digits"
    folder.mkdir()
    records = []
    for i, (pixels, text) in enumerate(zip(images, captions)):
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
        records.append({"file": f"{i:04d}.png", "text": text})
    return folder, write_listing(raw / "captions.jsonl", records)


def write_speech(raw: Path) -> tuple[Path, Path]:
    """Every phrase x voice x speed spoken by espeak-ng, leading/trailing silence trimmed."""
    import librosa
    import soundfile

    folder = raw / "speech"
    folder.mkdir()
    records = []
    for d, word in enumerate(WORDS):
        for p, phrase in enumerate(SPOKEN):
            text = phrase.format(w=word)
            for voice in VOICES:
                for speed in SPEEDS:
                    name = f"{d}-{p}-{voice}-{speed}.wav"
                    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                                         check=True, capture_output=True).stdout
                    wave, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
                    soundfile.write(folder / name, librosa.effects.trim(wave, top_db=30)[0], rate)
                    records.append({"file": name, "text": text})
    return folder, write_listing(raw / "transcripts.jsonl", records)


def save_roundtrip(dataset: Path, images: np.ndarray, out: Path) -> None:
    """The first 10 digits above their image-tokenizer decodings, for the eye."""
    from PIL import Image

    tok = load_tokenizer(dataset, "image")
    originals = [Image.fromarray(np.round(x * 255 / 16).astype(np.uint8), "L") for x in images[:10]]
    decoded = [tok.decode(ids) for ids in tok.encode(originals)]
    grid = np.concatenate([images[:10, :, :, None] / 16, np.stack(decoded)])
    save_png_grid(grid, out, titles=[f"orig {i}" for i in range(10)] + [f"decoded {i}" for i in range(10)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--skip-speech", action="store_true", help="do not build text_image_speech")
    args = parser.parse_args()
    if not args.skip_speech and shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng (or pass --skip-speech)")
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(SEED)
    captions = [rng.choice(CAPTIONS).format(w=WORDS[d], d=d) for d in digits.target]
    every_caption = [t.format(w=w, d=d) for t in CAPTIONS for d, w in enumerate(WORDS)]
    train_tokenizer(every_caption * 20 + captions + generic_english(), args.out / "tokenizer")

    # prepare records its input paths in meta.json: run it from `--out` on inputs in a fixed
    # relative folder (removed afterwards) so meta.json is the same on every machine.
    os.chdir(args.out.resolve())
    raw = Path("demo") / "raw-inputs"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    try:
        images, captions_file = write_digits(digits.images, captions, raw)
        inputs = dict(images=images, captions=captions_file, text_tokenizer=Path("tokenizer"))
        prepare(PrepareConfig(out=Path("demo/text_image"), **inputs, **COMMON))
        save_roundtrip(Path("demo/text_image"), digits.images, Path("demo/image_codec_roundtrip.png"))
        latent = {k: v for k, v in COMMON.items() if k not in ("patch_size", "image_codebook_size")}
        prepare(PrepareConfig(out=Path("demo/text_image_latent"), **inputs, **latent, image_encoder="pixels"))
        if not args.skip_speech:
            audio, transcripts = write_speech(raw)
            prepare(PrepareConfig(out=Path("demo/text_image_speech"), audio=audio, transcripts=transcripts,
                                  **inputs, **COMMON, **AUDIO))
    finally:
        shutil.rmtree(raw)


if __name__ == "__main__":
    main()
